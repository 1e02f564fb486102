import math

import numpy as np
import pytest

from calibft.eval.benchmarks.structured.answers import parse_number, parse_samples
from calibft.eval.text import strip_reasoning

GAUSS = ("gaussian", {"mu": 0.0, "sigma": 1.0})
POISSON = ("poisson", {"lambda": 4.0})
UNIFORM = ("uniform", {"a": 2.0, "b": 5.0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5", 1.5),
        ("-1.5", -1.5),
        ("+2", 2.0),
        ("  3.25\n", 3.25),
        ("\t-0.5 ", -0.5),
        ("7.", 7.0),
        (".5", 0.5),
        ("-.5", -0.5),
        ("1e3", 1000.0),
        ("1.5E-2", 0.015),
        ("-2.5e+1", -25.0),
        ("00012", 12.0),
        ("<think>maybe 3?</think>4.5", 4.5),
        ("<think>\nlet me think\n</think>\n\n-1.25", -1.25),
        ("<think>a</think> <think>b</think> 2", 2.0),
        ("reasoning done</think>6", 6.0),
        (
            "<|channel|>analysis<|message|>pick 3<|end|>"
            "<|start|>assistant<|channel|>final<|message|>3",
            3.0,
        ),
        ("analysisWe pick.assistantfinal0.25", 0.25),
        ("1.5<|return|>", 1.5),
        ("1.5<think>", 1.5),  # a trace started after the answer is removed
        ("2.9999999999", 2.9999999999),
    ],
)
def test_valid_literals(text: str, expected: float) -> None:
    assert parse_number(text) == pytest.approx(expected, rel=0, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "1.5 is my answer",
        "The number is 1.5",
        "1.5\n2.5",
        "1,5",
        "1 000",
        "e5",
        "1e",
        "1e+",
        "--1",
        "+-1",
        ".",
        "-.",
        "0x1A",
        "inf",
        "nan",
        "Infinity",
        "1_000",
        "½",
        "\u0661\u0662",  # Arabic-Indic digits: float() would accept them, the rule does not
        "1e999",  # overflows to inf: not finite
        "-1e400",
        "1" * 400,  # an integer literal too large for float64
        "<think>2.5",  # unterminated reasoning: no answer
        "<think>2.5</think>",
        "<|channel|>analysis<|message|>3",  # analysis channel only
        "1.5 <think>x</think> 2",
    ],
)
def test_invalid_literals(text: str) -> None:
    assert math.isnan(parse_number(text))


def test_strip_reasoning_keeps_plain_text() -> None:
    assert strip_reasoning(" 1.5 ") == " 1.5 "


def test_tiny_exponent_is_valid_zero() -> None:
    assert parse_number("1e-400") == 0.0


@pytest.mark.parametrize(
    ("family", "texts", "valid"),
    [
        # integer family: integral, in support [0, inf)
        (
            POISSON,
            ["3", "3.0", "3.000000000001", "3.5", "-1", "0", "1e2", "2.99999999"],
            [True, True, True, False, False, True, True, False],
        ),
        # bounded continuous family: support [a, b] inclusive
        (
            UNIFORM,
            ["2", "5", "1.999", "5.0001", "3.3", "junk"],
            [True, True, False, False, True, False],
        ),
        # unbounded continuous: anything finite
        (GAUSS, ["-1e300", "1e300", "1e309", "0.1"], [True, True, False, True]),
    ],
)
def test_support_and_integrality(family, texts: list[str], valid: list[bool]) -> None:
    parsed = parse_samples(texts, *family)
    np.testing.assert_array_equal(parsed.valid, valid)
    assert np.isnan(parsed.values[~parsed.valid]).all()
    assert np.isfinite(parsed.values[parsed.valid]).all()
    assert parsed.valid_rate == pytest.approx(sum(valid) / len(valid))


def test_parse_samples_values_and_rate() -> None:
    parsed = parse_samples(["0.5", "oops", "-2"], *GAUSS)
    np.testing.assert_array_equal(parsed.valid_values, [0.5, -2.0])
    assert parsed.values.dtype == np.float64
    assert parsed.valid_rate == pytest.approx(2 / 3)


def test_parse_samples_empty() -> None:
    parsed = parse_samples([], *GAUSS)
    assert parsed.values.shape == (0,)
    assert math.isnan(parsed.valid_rate)


def test_bad_params_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="sigma"):
        parse_samples(["1"], "gaussian", {"mu": 0.0, "sigma": -1.0})
