"""Figure helpers every benchmark's plots use: an Agg figure without pyplot, saved atomically;
the report's calibration-vs-retention Pareto figure.

Matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibft.files import atomic_write_bytes


def save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def new_figure(*args: Any, **kwargs: Any) -> Any:
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def pareto_front(
    points: Sequence[tuple[float, float]], *, higher_x: bool, higher_y: bool
) -> list[bool]:
    """Per point, whether it is on the Pareto front: no other point is at least as good on both
    axes and better on one (`higher_x`, `higher_y`: which way each axis is better)."""
    oriented = [(x if higher_x else -x, y if higher_y else -y) for x, y in points]
    return [
        not any(a >= u and b >= v and (a > u or b > v) for a, b in oriented) for u, v in oriented
    ]


def pareto_figure(
    names: Sequence[str],
    points: Sequence[tuple[float, float]],
    *,
    x_label: str,
    y_label: str,
    higher_x: bool,
    higher_y: bool,
) -> Any:
    """One labelled point per checkpoint, the Pareto front's points joined and highlighted."""
    front = pareto_front(points, higher_x=higher_x, higher_y=higher_y)
    fig = new_figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    for on_front, color, label in ((False, "0.6", "dominated"), (True, "C3", "Pareto front")):
        chosen = [p for p, f in zip(points, front, strict=True) if f == on_front]
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), color=color, zorder=3, label=label)
    ax.plot(*zip(*sorted(p for p, f in zip(points, front, strict=True) if f), strict=True), "C3-")
    for name, (x, y) in zip(names, points, strict=True):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    better = {True: "higher is better", False: "lower is better"}
    ax.set_xlabel(f"{x_label} ({better[higher_x]})")
    ax.set_ylabel(f"{y_label} ({better[higher_y]})")
    ax.set_title("Calibration vs retention per checkpoint")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
