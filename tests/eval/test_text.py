"""The transfer benchmarks' parsers against hand-worked cases (docs/benchmarks/open_random.md §3,
docs/benchmarks/mcq.md §3, docs/benchmarks/ssot.md §4): open-answer normalization, the strict MCQ
parser with its named errors, and SSOT answer extraction."""

import pytest

from calibft.eval.benchmarks.mcq import parse_mcq
from calibft.eval.prompting.ssot import extract_ssot_answer
from calibft.eval.text import normalize_open_answer

# --- open-ended answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('  "New   York"  \nsecond line', "New York"),
        ("<think>r</think>\nParis", "Paris"),
        ("</think>\nParis", "Paris"),
        ("Paris </think>", ""),  # text before a bare closing tag is reasoning (one policy)
        ("reasoning</think> Lima", "Lima"),
        ("<think>only", ""),
        ("<THINK>upper case\nblock</Think>Lima", "Lima"),
        ("<think>a</think>Oslo<think>never closed\nRome", "Oslo"),
        ("", ""),
        ("   \n\t \r\n ", ""),
        ("'Paris'", "Paris"),
        ("' Paris '", "Paris"),
        ("\"Paris'", "\"Paris'"),  # mismatched quotes stay
        ('"', '"'),  # one character: no pair to drop
        ('""', ""),
        ("Paris.", "Paris."),  # punctuation and case are kept
        ("paris", "paris"),
        ("\n\n  Tokyo\t\tJapan  \nKyoto", "Tokyo Japan"),
        ("Cairo\r\nGiza", "Cairo"),
        ("Quito\u2028Lima", "Quito"),  # a Unicode line separator ends the line as well
        ("Bern\x85Basel", "Bern"),
    ],
)
def test_normalize_open_answer(raw, expected) -> None:
    assert normalize_open_answer(raw) == expected


# --- MCQ parser -----------------------------------------------------------------------------

VALID = """Question: Which drug is a loop diuretic?
A. Furosemide
B. Spironolactone
C. Hydrochlorothiazide
D. Acetazolamide
Correct Answer: A
Explanation: Furosemide acts on the thick ascending limb."""


def with_line(old: str, new: str | None) -> str:
    """VALID with the line starting with `old` replaced by `new` (None: removed)."""
    lines = [(new if line.startswith(old) else line) for line in VALID.splitlines()]
    return "\n".join(line for line in lines if line is not None)


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        (VALID, ()),
        ("\n\n" + VALID + "\n\n", ()),  # blank lines are dropped
        ("<think>Let me write one.\nA. draft</think>\n" + VALID, ()),
        (with_line("Question:", None), ("missing_question",)),
        (with_line("B.", None), ("missing_option_b",)),
        (with_line("Correct Answer:", None), ("missing_correct_answer", "invalid_correct_answer")),
        (with_line("Explanation:", None), ("missing_explanation",)),
        (
            VALID.replace("Question: Which", "Question: Which\nQuestion: Which"),
            ("duplicate_question",),
        ),
        (VALID + "\nC. Mannitol", ("duplicate_option_c",)),
        (VALID + "\nCorrect Answer: B", ("duplicate_correct_answer",)),
        (VALID + "\nExplanation: again", ("duplicate_explanation",)),
        (with_line("Correct Answer:", "Correct Answer: E"), ("invalid_correct_answer",)),
        (with_line("Correct Answer:", "Correct Answer: B."), ("invalid_correct_answer",)),
        (with_line("Correct Answer:", "Correct Answer: (B)"), ("invalid_correct_answer",)),
        (with_line("Correct Answer:", "Correct Answer: **B**"), ("invalid_correct_answer",)),
        (with_line("Correct Answer:", "Correct Answer: B) Aspirin"), ("invalid_correct_answer",)),
        (
            with_line("Correct Answer:", "Correct answer: A"),
            ("unexpected_line", "missing_correct_answer", "invalid_correct_answer"),
        ),
        (VALID + "\nIt also lowers calcium.", ("unexpected_line",)),  # explanation on two lines
        (
            with_line("Question:", "**Question:** Which drug is a loop diuretic?"),
            ("unexpected_line", "missing_question"),
        ),
        (with_line("A.", "A) Furosemide"), ("unexpected_line", "missing_option_a")),
        (with_line("Question:", "Question:"), ("empty_question",)),
        (with_line("Explanation:", "Explanation:   "), ("empty_explanation",)),
        (with_line("D.", "D."), ("empty_option_d",)),
        ("", ("empty_response",)),
        ("   \n ", ("empty_response",)),
        ("<think>never finished", ("empty_response",)),
    ],
)
def test_parse_mcq_errors(text, errors) -> None:
    parsed = parse_mcq(text)
    assert parsed.errors == errors
    assert parsed.parseable is (errors == ())


def test_parse_mcq_fields_are_whitespace_normalized() -> None:
    text = (
        "  Question:   Which   drug\tis a loop diuretic?  \n A.  Furosemide   IV\n"
        "B. b\nC. c\nD. d\n"
        "Correct Answer:   C  \nExplanation:  short "
    )
    parsed = parse_mcq(text)
    assert parsed.parseable and parsed.answer == "C"
    assert parsed.question == "Which drug is a loop diuretic?"
    assert parsed.options == ("Furosemide IV", "b", "c", "d")
    assert parsed.explanation == "short"
    assert parsed.unique_options and parsed.correct_option_nonempty


def test_parse_mcq_flags_do_not_decide_parseability() -> None:
    same = with_line("B.", "B. Furosemide")  # two identical options
    parsed = parse_mcq(same)
    assert parsed.parseable and not parsed.unique_options
    # A valid letter is reported whatever else is wrong; an invalid one is None.
    broken = parse_mcq(with_line("Question:", None))
    assert not broken.parseable and broken.answer == "A"
    assert parse_mcq(with_line("Correct Answer:", "Correct Answer: E")).answer is None


def test_parse_mcq_truncated_inside_explanation_still_parses() -> None:
    assert parse_mcq(VALID[: VALID.index("thick")]).parseable
    cut = parse_mcq(VALID[: VALID.index("Correct")])
    assert not cut.parseable and "missing_correct_answer" in cut.errors


@pytest.mark.parametrize(
    "text", ["\x00\x01\ufffd\ufffd", "The question is about the heart." * 20, "A." * 500]
)
def test_parse_mcq_never_raises_on_garbage(text) -> None:
    parsed = parse_mcq(text)
    assert not parsed.parseable and parsed.errors


# --- SSOT extraction ------------------------------------------------------------------------

TAGGED = (
    "<random_string>k2J9xQ</random_string>\n<thinking>use the seed</thinking>\n"
    "<answer>\n 0.42 \n</answer>"
)
GPT_OSS_INLINE = (
    "analysisNeed seed.assistantfinal<random_string>abc</random_string><thinking>…</thinking>"
    "assistantanswer>Raccoon</answer>"
)


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        (TAGGED, {}, ("0.42", False)),
        (TAGGED.upper().replace("0.42", "7"), {}, ("7", False)),  # tags in any case
        ("<answer>1</answer> then <answer>2</answer>", {}, ("1", False)),  # the first pair
        ("<random_string>x</random_string>\n<thinking>t</thinking>\n0.42", {}, ("", True)),
        (
            "<random_string>x</random_string>\n<thinking>t</thinking>\n0.42\n",
            {"strict": False},
            ("0.42", True),
        ),
        ("<random_string>x</random_string><answer> 0.7 and more", {}, ("", True)),
        (
            "<random_string>x</random_string><answer> 0.7 and more",
            {"strict": False},
            ("0.7 and more", True),
        ),
        (
            "<random_string>x</random_string>",
            {"strict": False},
            ("<random_string>x</random_string>", True),
        ),
        (GPT_OSS_INLINE, {"gpt_oss": True}, ("Raccoon", False)),
        ("0.5436", {"gpt_oss": True}, ("0.5436", True)),
        ("0.5436", {}, ("", True)),  # a bare answer counts only for GPT-OSS
        ("analysisPick one.assistantfinal 0.25", {"gpt_oss": True}, ("0.25", True)),
        ("analysis a\nassistant b", {"gpt_oss": True}, ("", True)),
        ("<think>seed abc <answer>0.3</answer>", {}, ("", True)),  # a think block that never closes
        ("<think>seed abc</think><answer>0.3</answer>", {}, ("0.3", False)),
        ("", {}, ("", True)),
        ("", {"strict": False}, ("", True)),
    ],
)
def test_extract_ssot_answer(text, kwargs, expected) -> None:
    assert extract_ssot_answer(text, **kwargs) == expected
