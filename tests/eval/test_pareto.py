"""The calibration-vs-retention plot: the Pareto front (a constructed case and its defining
invariants), one labelled point per checkpoint with the front highlighted, and which figures of
a report it draws (written only when a retention and a calibration benchmark both ran)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import calibft.eval.report as report_module
from calibft.eval.figures import pareto_figure, pareto_front
from calibft.eval.report import trade_off_plots


def dominates(a, b, higher_x, higher_y) -> bool:
    ax, ay, bx, by = (*a, *b)
    if not higher_x:
        ax, bx = -ax, -bx
    if not higher_y:
        ay, by = -ay, -by
    return ax >= bx and ay >= by and (ax > bx or ay > by)


def test_front_of_a_constructed_case() -> None:
    # x: bits per byte, y: logit KL, both lower is better.
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0), (5.0, 5.0), (4.0, 2.0)]
    assert pareto_front(points, higher_x=False, higher_y=False) == [
        True,
        True,
        False,  # (2, 3) beats it on both
        True,
        True,  # a tie with a front point is on the front
        False,
        False,  # (4, 1): as good on x, better on y
    ]
    # x: accuracy, higher is better: now (5, 5) has the best x; (1, 5) is beaten by it.
    assert pareto_front(points, higher_x=True, higher_y=False) == [
        False,
        False,
        False,
        True,
        False,
        True,
        False,
    ]


coordinates = st.floats(-5, 5, allow_nan=False).map(lambda v: round(v, 1))


@given(st.lists(st.tuples(coordinates, coordinates), min_size=1, max_size=12), st.booleans())
def test_front_is_exactly_the_undominated_points(points, higher_x) -> None:
    front = pareto_front(points, higher_x=higher_x, higher_y=False)
    assert any(front)
    for point, on_front in zip(points, front, strict=True):
        beaten = any(dominates(other, point, higher_x, False) for other in points)
        assert on_front == (not beaten)
        if not on_front:  # every dominated point is beaten by a point of the front
            assert any(
                dominates(other, point, higher_x, False)
                for other, f in zip(points, front, strict=True)
                if f
            )


def test_figure_has_one_labelled_point_per_checkpoint() -> None:
    names = ["base", "a@0.5", "a@1", "b"]
    points = [(1.0, 0.9), (1.1, 0.5), (1.3, 0.2), (1.4, 0.6)]
    fig = pareto_figure(
        names, points, x_label="bits per byte", y_label="logit KL", higher_x=False, higher_y=False
    )
    (ax,) = fig.axes
    drawn = {
        collection.get_label(): [tuple(p) for p in collection.get_offsets()]
        for collection in ax.collections
    }
    assert drawn == {"Pareto front": points[:3], "dominated": [points[3]]}
    assert [text.get_text() for text in ax.texts] == names
    (line,) = ax.lines  # the front, joined in x order
    assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == points[:3]
    assert ax.get_xlabel() == "bits per byte (lower is better)"
    assert ax.get_ylabel() == "logit KL (lower is better)"


def summaries(values):
    """A report's benchmarks part from {benchmark: {checkpoint: summary}}."""
    return {"benchmarks": {n: {"checkpoints": c} for n, c in values.items()}}


def test_report_plots_draw_each_retention_and_calibration_pair(tmp_path, monkeypatch) -> None:
    checkpoints = ["base", "run@0.5", "run@1"]
    report = summaries(
        {
            "paloma": {c: {"bits_per_byte": 1.0 + i / 10} for i, c in enumerate(checkpoints)},
            "structured": {
                c: {"test_ood_family": {"logit_kl": 2.0 - i, "valid_rate": 0.5}}
                for i, c in enumerate(checkpoints)
            },
            # TV undefined for one checkpoint: the plot falls back to the valid mass.
            "categorical": {
                c: {"mean_exact_tv": None if i == 1 else 0.4, "mean_exact_valid_mass": i / 4}
                for i, c in enumerate(checkpoints)
            },
            "mcq": {c: {"tv": 0.1} for c in checkpoints},  # neither kind
        }
    )
    drawn = []

    def recording(names, points, **axes):
        drawn.append((names, points, axes))
        return pareto_figure(names, points, **axes)

    monkeypatch.setattr(report_module, "pareto_figure", recording)
    paths = trade_off_plots(tmp_path, report)
    assert [p.name for p in paths] == [
        "pareto_paloma_structured.png",
        "pareto_paloma_categorical.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    (names, points, axes), (_, categorical, fallback) = drawn
    assert names == checkpoints
    assert points == [(1.0, 2.0), (1.1, 1.0), (1.2, 0.0)]
    assert axes["x_label"] == "bits per byte (paloma)" and axes["higher_x"] is False
    assert axes["y_label"] == "OOD logit KL (structured)" and axes["higher_y"] is False
    assert fallback["y_label"] == "mean exact valid mass (categorical)" and fallback["higher_y"]
    assert [y for _, y in categorical] == [0.0, 0.25, 0.5]


@pytest.mark.parametrize("kept", [["paloma"], ["structured", "categorical"]])
def test_no_plot_without_both_kinds(tmp_path, kept) -> None:
    values = {
        "paloma": {"base": {"bits_per_byte": 1.0}},
        "structured": {"base": {"test_ood_family": {"logit_kl": 1.0}}},
        "categorical": {"base": {"mean_exact_tv": 0.3}},
    }
    report = summaries({n: values[n] for n in kept})
    assert trade_off_plots(tmp_path, report) == []
    assert not list(tmp_path.iterdir())
