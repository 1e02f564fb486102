"""Cost of the exact evaluation of one categorical prompt vs 1000 sampled generations, same model,
same run (SmolLM2-135M on CPU by default): lists of 10, 100 and 1000 two-word answers.

    python benches/bench_categorical.py            # 10, 100, 1000 answers; 1000 samples each
    python benches/bench_categorical.py --quick    # 10 and 100 answers, 100 samples (the cost of
                                                   # 1000 extrapolated); about a minute

The exact side is the benchmark's own per-prompt work with sampling off (prefill, one
tree-attention pass over the answers' trie, the figures); the sampled side is N generations from
the same prefilled prompt at the benchmark's defaults (temperature 1, at most 16 new tokens),
decoded and matched to the list. Writes benches/results/bench_categorical[-quick].json (or
--output) and prints it. Target: exact <= 1/10 of the cost of 1000 generations, up to 1000 answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from calibft.eval.benchmarks import categorical
from calibft.eval.contract import Item
from calibft.lm import HFBackend, resolve_checkpoints
from calibft.targets import Target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, machine_info, write_json  # noqa: E402

ADJECTIVES = (
    "brave calm clever eager fancy gentle happy jolly kind lively merry nimble proud quiet rapid "
    "shy silly swift tidy witty bold bright cool daring fierce grand humble keen loyal mighty "
    "noble plucky quick rusty sleepy sunny tiny wild young zesty"
).split()
ANIMALS = (
    "otter badger falcon heron lynx moose panda raven tiger walrus beaver camel donkey eagle "
    "ferret gecko hippo koala lemur mole newt owl parrot rabbit salmon"
).split()
PROMPT = (
    "Invent a random creature name: one adjective followed by one animal, such as 'brave otter'. "
    "Output ONLY the two words in lowercase."
)


def answers(count: int) -> tuple[str, ...]:
    """`count` distinct two-word answers, spread over both word lists."""
    pairs = [f"{a} {b}" for b in ANIMALS for a in ADJECTIVES]
    if count > len(pairs):
        raise SystemExit(f"at most {len(pairs)} answers")
    step = len(pairs) / count
    return tuple(pairs[int(i * step)] for i in range(count))


def bench_size(lm, count: int, args) -> dict:
    target = Target.from_answers(PROMPT, answers(count), (1.0,) * count, "creatures")
    config = categorical.Config(samples=0, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    item = Item(target.key, target.group, target)
    shared = categorical.setup(config, [item])
    job = shared.job(lm, target)  # tokenizer checks, trie and layout
    prepare_s = time.perf_counter() - start
    categorical.run_item(lm, item, config, shared, seed=0)  # warm-up: one-time costs
    start = time.perf_counter()
    record = categorical.run_item(lm, item, config, shared, seed=0)
    exact_s = time.perf_counter() - start

    state = lm.prefill(job.prompt_ids)
    start = time.perf_counter()
    completions = lm.sample(state, args.samples, seed=0, max_new_tokens=args.max_new_tokens)
    texts = [lm.decode(ids) for ids in completions]
    ended = [len(ids) < args.max_new_tokens for ids in completions]
    sampled = categorical.sampled_figures(texts, ended, target, job, case_insensitive=False)
    sample_s = time.perf_counter() - start
    per_1000 = sample_s * 1000 / args.samples
    return {
        "answers": count,
        "trie_nodes": int(job.layout.num_nodes),
        "internal_nodes": int(len(job.layout.internal)),
        "prepare_s": prepare_s,
        "exact_s": exact_s,
        "exact_valid_mass": record["exact_valid_mass"],
        "exact_tv": record["exact_tv"],
        "samples": args.samples,
        "sample_s": sample_s,
        "sample_tokens": int(sum(len(c) for c in completions)),
        "sample_s_per_1000": per_1000,
        "sampled_valid_rate": sampled["sampled_valid_rate"],
        "exact_over_sampled_1000": exact_s / per_1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 10 and 100 answers, 100 samples"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default benches/results/bench_categorical[-quick].json)",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="model alias, HF id or local directory"
    )
    parser.add_argument(
        "--sizes", nargs="*", type=int, help="list sizes (default 10 100 1000; quick 10 100)"
    )
    parser.add_argument(
        "--samples", type=int, help="sampled generations per list (default 1000; quick 100)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="generation limit (benchmark default 16)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000])
    args.samples = args.samples or (100 if args.quick else 1000)
    (base,) = resolve_checkpoints([])
    lm = HFBackend(args.model, [base], device="cpu").session(base)
    rows = [bench_size(lm, count, args) for count in args.sizes]
    out = {
        "bench": "categorical",
        "mode": "quick" if args.quick else "full",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "target_ratio": 0.1,
        "target_met": all(r["exact_over_sampled_1000"] <= 0.1 for r in rows),
        "sizes": rows,
        "machine": machine_info(),
    }
    write_json(args.output or default_output("bench_categorical", args.quick), out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
