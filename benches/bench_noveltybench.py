"""Wall time of NoveltyBench's generation + lexical partition (SmolLM2-135M, CPU by default), and
the lexical distinct count of the base model and each adapter on the same prompts.

    python benches/bench_noveltybench.py --adapter runs/quick   # 10 curated + 10 WildChat prompts
                                                                # x 10 generations x 512 tokens
    python benches/bench_noveltybench.py --quick                # 2 curated prompts x 3 x 16 tokens

Each run goes through the runner exactly as `calibft eval noveltybench --classifier none
--reward-model none --splits S --per-split N [--adapter DIR]` does (neither scoring model is
available offline, so only the lexical rule partitions). It is timed per split and per checkpoint
(the base first; then the adapters, the base's records coming from the cache), the model load
is timed apart, and the full-size time (100 curated + 1000 WildChat prompts) is extrapolated from
the per-prompt times of each split. Writes benches/results/bench_noveltybench[-quick].json and the
run's report.json beside it (…-report.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from calibft.eval.benchmarks import noveltybench as nb
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate
from calibft.lm.load import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, machine_info, write_json  # noqa: E402

FULL_PROMPTS = {split: count for split, (_, count) in nb.SPLITS.items()}


def _run(model: str, adapters: list[str], output: Path, settings: dict) -> tuple[dict, float]:
    shared = EvalConfig(
        model=model, adapters=adapters, output=str(output), progress=False, plots=False
    )
    config = nb.Config(classifier="none", reward_model="none", **settings)
    start = time.perf_counter()
    report = evaluate(shared, {"noveltybench": config})
    return report, time.perf_counter() - start


def _lexical_partition_seconds(cache: Path) -> tuple[float, int]:
    """Time to partition every cached record's generations again with the lexical rule alone."""
    records = [json.loads(p.read_text()) for p in sorted(cache.rglob("*.json"))]
    start = time.perf_counter()
    for record in records:
        nb.partition(record["generations"], None)
    return time.perf_counter() - start, len(records)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--adapter", action="append", default=[], help="LoRA adapter directory (repeatable)"
    )
    parser.add_argument("--per-split", type=int, help="prompts per split (default 10; quick: 2)")
    parser.add_argument(
        "--splits", help="comma-separated (default curated,wildchat; quick: curated)"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="generations per prompt (default 10; quick: 3)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 512; quick: 16")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    per_split = args.per_split or (2 if args.quick else 10)
    splits = (args.splits or ("curated" if args.quick else "curated,wildchat")).split(",")
    samples = args.samples or (3 if args.quick else 10)
    max_new_tokens = args.max_new_tokens or (16 if args.quick else 512)
    output = args.output or default_output("bench_noveltybench", args.quick)

    start = time.perf_counter()
    load_model_and_tokenizer(args.model)
    load_s = time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="bench_noveltybench."))
    timings = []
    try:
        settings = {"per_split": per_split, "samples": samples, "max_new_tokens": max_new_tokens}
        for split in splits:
            chosen = {**settings, "splits": [split]}
            _, base_s = _run(args.model, [], workdir, chosen)
            timings.append({"split": split, "checkpoint": "base", "wall_s": base_s})
            if args.adapter:
                _, both_s = _run(args.model, args.adapter, workdir, chosen)
                timings.append({"split": split, "checkpoint": "adapters", "wall_s": both_s})
        report, _ = _run(args.model, args.adapter, workdir, {**settings, "splits": splits})
        partition_s, partitioned = _lexical_partition_seconds(workdir / "cache" / "noveltybench")
        report_copy = output.with_name(output.stem + "-report.json")
        report_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "report.json", report_copy)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = report["benchmarks"]["noveltybench"]
    items = result["items"]
    for row in timings:
        # Every run loads the model once; the generation time is the rest (the lexical partition
        # inside it is negligible: see lexical_partition_s).
        row["prompts"] = per_split
        row["generate_s"] = max(row["wall_s"] - load_s, 0.0)
        row["per_prompt_s"] = row["generate_s"] / per_split
    per_prompt = {(row["split"], row["checkpoint"]): row["per_prompt_s"] for row in timings}
    extrapolated = {
        checkpoint: sum(per_prompt[(s, checkpoint)] * FULL_PROMPTS[s] for s in splits)
        for checkpoint in dict.fromkeys(c for _, c in per_prompt)
    }
    data = {
        "bench": "noveltybench",
        "mode": "quick" if args.quick else "full",
        "model": args.model,
        "adapters": args.adapter,
        "splits": splits,
        "prompts_per_split": per_split,
        "samples": samples,
        "max_new_tokens": max_new_tokens,
        "model_load_s": load_s,
        # On a shared machine one thread per process can beat two oversubscribed ones by far.
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
        "lexical_partition_s": partition_s,
        "lexical_partition_records": partitioned,
        "extrapolated_prompts": {s: FULL_PROMPTS[s] for s in splits},
        # An extrapolation from the measured per-prompt time of each split, not a measurement.
        "extrapolated_generate_s": extrapolated,
        "summaries": result["checkpoints"],
        "tokens_generated": {
            name: sum(sum(i.get("tokens") or []) for i in items if i["checkpoint"] == name)
            for name in result["checkpoints"]
        },
        "report_json": str(report_copy),
        "machine": machine_info(),
    }
    write_json(output, data)
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
