"""Throughput of the retention evaluations' scoring on SmolLM2-135M (CPU by default), each against
the plain loop it replaces, measured in the same run on the same inputs:

- PALOMA-style perplexity: calibft's `document_nlls` (windows of several documents per forward
  pass, the LM head in chunks) vs one 2048-token window per forward pass with full logits;
- multiple-choice scoring: `loglikelihood_requests` (the shared few-shot prompt run once, the
  choices batched over its KV cache) vs one forward pass per choice over prompt + choice.

    python benches/bench_retention.py           # ~120k tokens of documents, 100 MC items
    python benches/bench_retention.py --quick   # ~25k tokens, 20 MC items; a few minutes

The text is the WildChat prompts shipped for NoveltyBench (PALOMA itself is not available
offline), grouped into documents of 150 to 3000 tokens. Writes
benches/results/bench_retention[-quick].json (or --output) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from calibft.lm.load import load_model_and_tokenizer
from calibft.lm.score import document_nlls, request_logprobs, scored_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, format_table, machine_info, write_json  # noqa: E402

DOC_LENGTHS = (150, 400, 900, 3000)  # target tokens per document, in turn
FEW_SHOT_PROMPTS = 5  # prompts per MC context: a few-shot block of a few hundred tokens
CHOICES = 4


def wildchat_prompts() -> list[str]:
    path = resources.files("calibft") / "data" / "noveltybench" / "wildchat_1k.jsonl"
    return [
        json.loads(line)["prompt"] for line in path.read_text("utf-8").splitlines() if line.strip()
    ]


def build_documents(tokenizer, prompts: list[str], total_tokens: int) -> list[list[int]]:
    """Consecutive prompts joined into documents of the DOC_LENGTHS sizes, up to `total_tokens`."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    documents, current, total = [], [], 0
    for ids in encoded * 10:
        current += ids + separator
        if len(current) >= DOC_LENGTHS[len(documents) % len(DOC_LENGTHS)]:
            documents.append(current[: DOC_LENGTHS[len(documents) % len(DOC_LENGTHS)]])
            total += len(documents[-1])
            current = []
            if total >= total_tokens:
                break
    return documents


@torch.inference_mode()
def one_window_per_pass(model, documents: list[list[int]]) -> list[float]:
    """The plain loop: each 2048/1024 window alone, the model's full logits, log-softmax."""
    out = []
    for ids in documents:
        total = 0.0
        for start, end, first in scored_windows(len(ids)):
            logits = model(torch.tensor([ids[start:end]])).logits[0].float()
            logprobs = torch.log_softmax(logits[first - start - 1 : end - start - 1], dim=-1)
            total -= float(logprobs.gather(1, torch.tensor(ids[first:end])[:, None]).sum())
        out.append(total)
    return out


def build_mc_items(
    tokenizer, prompts: list[str], count: int
) -> list[list[tuple[list[int], list[int]]]]:
    """Per item, CHOICES (context, continuation) token requests: a chat-rendered few-shot block
    with a question, and short endings taken from other prompts (HellaSwag-like)."""
    items = []
    for i in range(count):
        shots = [
            prompts[(i * FEW_SHOT_PROMPTS + k) % len(prompts)] for k in range(FEW_SHOT_PROMPTS)
        ]
        text = (
            "\n\n".join(f"Request: {s}\nTopic: {s.split()[0]}" for s in shots)
            + "\n\nRequest: "
            + prompts[-1 - i]
        )
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        context = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        endings = [
            " " + " ".join(prompts[(7 * i + c) % len(prompts)].split()[:12]) for c in range(CHOICES)
        ]
        items.append(
            [(context, tokenizer(e, add_special_tokens=False)["input_ids"]) for e in endings]
        )
    return items


@torch.inference_mode()
def one_pass_per_choice(model, items) -> list[list[float]]:
    out = []
    for requests in items:
        scores = []
        for context, continuation in requests:
            ids = context + continuation
            logprobs = torch.log_softmax(
                model(torch.tensor([ids])).logits[0, len(context) - 1 : -1].float(), dim=-1
            )
            scores.append(float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum()))
        out.append(scores)
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke sizes: ~25k tokens, 20 MC items"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default benches/results/bench_retention[-quick].json)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--batch-tokens", type=int, default=8192, help="tokens per forward pass of document_nlls"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    prompts = wildchat_prompts()
    documents = build_documents(tokenizer, prompts, 25_000 if args.quick else 120_000)
    mc_items = build_mc_items(tokenizer, prompts, 20 if args.quick else 100)
    scored_tokens = sum(len(d) - 1 for d in documents)

    document_nlls(model, documents[:2], batch_tokens=args.batch_tokens)  # warm-up: first-call costs
    batched, batched_s = timed(
        lambda: document_nlls(model, documents, batch_tokens=args.batch_tokens)
    )
    plain, plain_s = timed(lambda: one_window_per_pass(model, documents))
    relative = max(abs(a - b) / abs(b) for (a, _), b in zip(batched, plain, strict=True))
    perplexity = {
        "documents": len(documents),
        "scored_tokens": scored_tokens,
        "windows": sum(len(scored_windows(len(d))) for d in documents),
        "batch_tokens": args.batch_tokens,
        "calibft_s": batched_s,
        "calibft_tokens_per_s": scored_tokens / batched_s,
        "plain_loop_s": plain_s,
        "plain_loop_tokens_per_s": scored_tokens / plain_s,
        "speedup": plain_s / batched_s,
        "max_relative_nll_difference": relative,
    }

    flat = [r for item in mc_items for r in item]
    request_logprobs(model, mc_items[0])  # warm-up
    shared, shared_s = timed(lambda: [request_logprobs(model, item) for item in mc_items])
    separate, separate_s = timed(lambda: one_pass_per_choice(model, mc_items))
    difference = max(
        abs(a - b) for x, y in zip(shared, separate, strict=True) for a, b in zip(x, y, strict=True)
    )
    same_choice = float(
        np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(shared, separate, strict=True)])
    )
    multiple_choice = {
        "items": len(mc_items),
        "choices_per_item": CHOICES,
        "mean_context_tokens": float(np.mean([len(c) for c, _ in flat])),
        "mean_continuation_tokens": float(np.mean([len(c) for _, c in flat])),
        "calibft_s": shared_s,
        "calibft_items_per_s": len(mc_items) / shared_s,
        "one_pass_per_choice_s": separate_s,
        "one_pass_per_choice_items_per_s": len(mc_items) / separate_s,
        "speedup": separate_s / shared_s,
        "max_abs_logprob_difference": difference,
        "same_argmax_fraction": same_choice,
    }
    out = {
        "bench": "retention",
        "mode": "quick" if args.quick else "full",
        "model": args.model,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "perplexity": perplexity,
        "multiple_choice": multiple_choice,
        "machine": machine_info(),
    }
    write_json(args.output or default_output("bench_retention", args.quick), out)
    print(
        format_table(
            [
                {
                    "what": "perplexity (tokens/s)",
                    "calibft": perplexity["calibft_tokens_per_s"],
                    "plain": perplexity["plain_loop_tokens_per_s"],
                    "speedup": perplexity["speedup"],
                },
                {
                    "what": "MC scoring (items/s)",
                    "calibft": multiple_choice["calibft_items_per_s"],
                    "plain": multiple_choice["one_pass_per_choice_items_per_s"],
                    "speedup": multiple_choice["speedup"],
                },
            ],
            [
                ("what", "measure"),
                ("calibft", "calibft"),
                ("plain", "plain loop"),
                ("speedup", "speedup"),
            ],
        )
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
