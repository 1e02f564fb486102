"""String Seed of Thought (docs/benchmarks/ssot.md) as a mode of `structured` and `open_random`:
the instruction texts, message roles and rendering per model family, the mode's defaults, and
both pipelines end to end on a tiny model (with canned tagged answers, and as generated)."""

import hashlib
import json

import pytest
from tiny_models import tiny_tokenizer

import calibft.cli as cli
import calibft.eval.runner as runner
from calibft.chat import ChatFormat
from calibft.config import validate
from calibft.eval.benchmarks import open_random, structured
from calibft.eval.config import EvalConfig
from calibft.eval.prompting import ssot
from calibft.eval.runner import evaluate
from calibft.lm import HFSession

# SHA-256 and length of each instruction text, as the protocol fixes them.
INSTRUCTION_HASHES = {
    (ssot.PIF, False): ("7e0d03994cabc0a085b6ae273d4356b22f08a62a0a7188ed40dc29e199c266ad", 1346),
    (ssot.DAG, False): ("14c59f1f995bf7e531323e104196b7e383ad84a02834533270fc53444518baa0", 1416),
    (ssot.PIF, True): ("6fd8c058e52e7b28fd22383095fb0196e5b4b43d11b8106e56a60e364b6d4254", 626),
    (ssot.DAG, True): ("dffd32788918489b54561de76785d3937f10150cc7d51c1f3b7947eff52f52ae", 624),
}
# A harmony-style stand-in: the `<|channel|>` marker is what identifies GPT-OSS templates.
HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}{# <|channel|> #}"
)
REFUSING_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "Name a random city. Output ONLY the answer."


def chat_with(template):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return ChatFormat.from_tokenizer(tokenizer)


@pytest.mark.parametrize("key", list(INSTRUCTION_HASHES))
def test_instruction_texts_are_the_protocols(key) -> None:
    mode, gpt_oss = key
    text = ssot.instruction(mode, gpt_oss=gpt_oss)
    assert (hashlib.sha256(text.encode()).hexdigest(), len(text)) == INSTRUCTION_HASHES[key]


def test_pif_text_keeps_its_two_steps_slip() -> None:
    text = ssot.instruction(ssot.PIF, gpt_oss=False)
    assert (
        "Follow these two steps for every instruction:" in text
        and "\n3. Provide your final answer" in text
    )
    with pytest.raises(ValueError, match="SSOT mode must be one of pif, dag"):
        ssot.instruction("both", gpt_oss=False)


@pytest.mark.parametrize(("gpt_oss", "role"), [(False, "system"), (True, "developer")])
def test_messages_put_the_instruction_first_and_the_prompt_unchanged(gpt_oss, role) -> None:
    first, second = ssot.messages(PROMPT, ssot.DAG, gpt_oss=gpt_oss)
    assert first == {"role": role, "content": ssot.instruction(ssot.DAG, gpt_oss=gpt_oss)}
    assert second == {"role": "user", "content": PROMPT}


def test_render_with_a_chatml_template() -> None:
    chat = ChatFormat.from_tokenizer(tiny_tokenizer())
    assert not ssot.is_gpt_oss(chat)
    text = ssot.render(chat, PROMPT, ssot.PIF)
    assert text == (
        f"<|im_start|>system\n{ssot.instruction(ssot.PIF, gpt_oss=False)}<|im_end|>\n"
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        ssot.prompt_ids(chat, PROMPT, ssot.PIF)
        == chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_render_for_gpt_oss_uses_a_developer_message_and_no_final_prefix() -> None:
    chat = chat_with(HARMONY_TEMPLATE)
    assert ssot.is_gpt_oss(chat)
    assert chat.render(PROMPT).endswith("<|channel|>final<|message|>")  # the direct prompt
    text = ssot.render(chat, PROMPT, ssot.DAG)
    assert text.startswith(
        f"<|start|>developer<|message|>{ssot.instruction(ssot.DAG, gpt_oss=True)}<|end|>"
    )
    assert text.endswith(f"<|start|>user<|message|>{PROMPT}<|end|><|start|>assistant")


@pytest.mark.slow
def test_render_for_qwen3_turns_thinking_on() -> None:
    from calibft.assets import qwen3_tokenizer

    chat = ChatFormat.from_tokenizer(qwen3_tokenizer())
    assert "<think>\n\n</think>" in chat.render(PROMPT)  # the direct prompt: thinking off
    text = ssot.render(chat, PROMPT, ssot.PIF)
    assert "<think>" not in text
    assert text.startswith(
        f"<|im_start|>system\n{ssot.instruction(ssot.PIF, gpt_oss=False)}<|im_end|>"
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_refusing_the_system_message_is_a_clear_error() -> None:
    chat = chat_with(REFUSING_TEMPLATE)
    with pytest.raises(ValueError, match="refuses a system message"):
        ssot.render(chat, PROMPT, ssot.PIF)


def test_a_bare_model_gets_the_instruction_before_the_prompt() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        chat = ChatFormat.from_tokenizer(tokenizer)
    assert (
        ssot.render(chat, PROMPT, ssot.DAG)
        == f"{ssot.instruction(ssot.DAG, gpt_oss=False)}\n\n{PROMPT}"
    )


def test_structured_defaults_follow_the_mode() -> None:
    plain, under_ssot = structured.Config(), structured.Config(ssot=True)
    assert (plain.samples, plain.max_new_tokens, plain.exact) == (1000, 32, True)
    assert (under_ssot.samples, under_ssot.max_new_tokens, under_ssot.exact) == (250, 2048, False)
    assert structured.Config(ssot=True, samples=40).samples == 40
    assert structured.Config(exact=False).exact is False
    with pytest.raises(ValueError, match="drop --exact"):
        validate(structured.Config(ssot=True, exact=True))


def test_cli_ssot_flag_reaches_both_benchmarks(monkeypatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(
        runner,
        "evaluate_rank",
        lambda shared, benches, ranks: seen.append(benches) or {"benchmarks": {}},
    )
    assert cli.main(["eval", "structured", "open_random", "--ssot", "--output", str(tmp_path)]) == 0
    config, open_config = seen[-1]["structured"], seen[-1]["open_random"]
    assert (config.ssot, config.samples, config.max_new_tokens, config.exact) == (
        True,
        250,
        2048,
        False,
    )
    assert (open_config.ssot, open_config.max_new_tokens, open_config.support) == (
        True,
        4096,
        False,
    )
    argv = [
        "eval",
        "structured",
        "open_random",
        "--ssot",
        "--samples",
        "10",
        "structured.max_new_tokens=99",
        "--no-ssot-strict",
        "--output",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    config, open_config = seen[-1]["structured"], seen[-1]["open_random"]
    assert (
        config.samples,
        config.max_new_tokens,
        open_config.samples,
        open_config.max_new_tokens,
    ) == (10, 99, 10, 4096)
    assert not config.ssot_strict and not open_config.ssot_strict


def test_cli_refuses_ssot_with_the_exact_pass(tmp_path, capsys) -> None:
    assert cli.main(["eval", "structured", "--ssot", "--exact", "--output", str(tmp_path)]) == 2
    assert "drop --exact" in capsys.readouterr().err


TAGGED = (
    "<random_string>f9Qz</random_string>\n<thinking>seeded pick</thinking>\n<answer>{}</answer>"
)


def test_both_pipelines_score_extracted_answers(model_dir, tmp_path, monkeypatch) -> None:
    """With a backend that writes tagged answers, structured parses the numbers inside the tags and
    open_random counts the normalized names (one reply in three has no tag: degraded, invalid)."""
    replies = {
        "structured": [TAGGED.format("1"), TAGGED.format(" 1 "), "1"],
        "open_random": [TAGGED.format("Alpha City"), TAGGED.format('"Alpha City"'), "Beta Town"],
    }
    prompts = []

    def canned(self, state, n, *, seed, max_new_tokens):
        prompts.append(self.tokenizer.decode(list(state.ids)))
        texts = replies["open_random" if "Output ONLY the answer" in prompts[-1] else "structured"]
        return [self.tokenizer.encode(texts[i % 3], add_special_tokens=False) for i in range(n)]

    monkeypatch.setattr(HFSession, "sample", canned)
    shared = EvalConfig(model=str(model_dir), output=str(tmp_path), progress=False)
    report = evaluate(
        shared,
        {
            "structured": structured.Config(ssot=True, split="ood", per_family=1, samples=3),
            "open_random": open_random.Config(ssot=True, categories=["city"], samples=3),
        },
    )
    assert all(ssot.instruction(ssot.PIF, gpt_oss=False) in p for p in prompts[:6])
    assert ssot.instruction(ssot.DAG, gpt_oss=False) in prompts[-1]
    records = [
        json.loads(p.read_text()) for p in (tmp_path / "cache" / "structured").rglob("*.json")
    ]
    assert len(records) == 6
    for record in records:
        assert record["answers"] == ["1", "1", ""] and record["sample_values"] == [1.0, 1.0]
        assert record["valid_rate"] == pytest.approx(2 / 3) and record[
            "ssot_degraded_rate"
        ] == pytest.approx(1 / 3)
        assert record["logit_kl"] is None and "exact_valid_mass" not in record
    summary = report["benchmarks"]["structured"]["checkpoints"]["base"]["test_ood_family"]
    assert summary["valid_rate"] == pytest.approx(2 / 3)
    assert summary["logit_kl"] is None and summary["exact_valid_mass"] is None
    (item,) = report["benchmarks"]["open_random"]["items"]
    assert item["output_counts"] == {"Alpha City": 2} and item["empty_output_count"] == 1
    figures = report["benchmarks"]["open_random"]["checkpoints"]["base"]
    assert figures["mean_support_90"] is None and figures["ssot_degraded_rate"] == pytest.approx(
        1 / 3
    )


def test_ssot_runs_on_a_tiny_model_from_the_cli(model_dir, adapter_dir, tmp_path) -> None:
    """As generated: a random model writes no tags, so every answer is a counted failure."""
    argv = [
        "eval",
        "structured",
        "open_random",
        "--ssot",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter_dir),
        "--output",
        str(tmp_path),
        "--no-progress",
        "--no-plots",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--split",
        "ood",
        "--per-family",
        "1",
        "open_random.categories=city,weekday",
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("base", "soft-run"):
        figures = report["benchmarks"]["structured"]["checkpoints"][name]["test_ood_family"]
        assert figures["logit_kl"] is None and figures["exact_valid_mass"] is None
        assert 0.0 <= figures["valid_rate"] <= 1.0
        assert report["benchmarks"]["open_random"]["checkpoints"][name]["mean_support_90"] is None
    for item in report["benchmarks"]["structured"]["items"]:
        assert 0.0 <= item["ssot_degraded_rate"] <= 1.0
    assert (
        report["config"]["structured"]["samples"] == 2
        and report["config"]["structured"]["ssot"] is True
    )
