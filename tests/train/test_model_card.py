"""The adapter directory's model card."""

from calibft.train.config import load_config
from calibft.train.model_card import render_model_card


def test_without_a_report_there_is_no_comparison():
    assert "## Before / after" not in render_model_card(load_config(preset="quick"), None)


def test_alias_is_named_by_its_published_model_and_the_table_is_included():
    config = load_config(preset="quick")
    report = {
        "config": {"structured": {"samples": 100}},
        "benchmarks": {
            "structured": {
                "checkpoints": {
                    "base": {"test_ood_family": {"valid_rate": 0.0, "median_normalized_w1": None}},
                    "quick": {
                        "test_ood_family": {"valid_rate": 0.6, "median_normalized_w1": 0.368}
                    },
                },
                "items": [
                    {
                        "checkpoint": c,
                        "split": "test_ood_family",
                        "family": "chi",
                        "params": {"df": 5.0},
                        "valid_rate": v,
                        "normalized_w1": w,
                    }
                    for c, v, w in (("base", 0.0, None), ("quick", 0.99, 0.846))
                ],
            }
        },
    }
    card = render_model_card(config, report)
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "(calibft alias `smollm2-135m`)" in card
    assert "12 evenly spaced prompts per family" in card and "answers with 3 decimals" in card
    table = card.split("## Before / after")[1]
    assert "`calibft eval structured` after training" in table
    assert (
        "| checkpoint | structured: OOD valid rate | structured: OOD median norm. W1 |\n"
        "|---|---|---|\n| base | 0 | n/a |\n| quick | 0.6 | 0.368 |"
    ) in table
    assert "calibft eval --model smollm2-135m --adapter" in card
