"""Batched vs one-item-at-a-time evaluation, and 2 ranks vs 1 process (SmolLM2-135M, CPU).

    python benches/bench_batch.py            # 32 GSM8K-style rows x 16 tokens, 4 NoveltyBench
                                             # prompts x 10 x 16 tokens, 32 MC rows x 4 choices;
                                             # sharded: 40 MC rows, 1 process vs torchrun x 2
    python benches/bench_batch.py --quick    # 8 rows / 4 prompts x 8 tokens; sharded 20 rows

Part 1 runs each workload twice in one process on one loaded model, through the benchmarks' own
functions as the runner calls them: `run_item` per item, then `run_batch` on batches of
`--batch-items` (the runner's default), and checks the records are identical. Workloads:
greedy GSM8K generation (`retention`, tinyGSM8k rows), NoveltyBench's 10-sample generation
(curated prompts, lexical partition only) and multiple-choice log-likelihood scoring
(`retention`, tinyMMLU rows). The rows are synthetic (no dataset download), shaped as
tinyBenchmarks' are.

Part 2 times the whole command `calibft eval retention --tasks tiny_mmlu` (scoring-bound) as one
process and as `torchrun --nproc_per_node 2` (each rank one thread, as torchrun sets), in fresh
output directories, and checks the two runs cached identical records.

Writes benches/results/bench_batch[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calibft.eval.benchmarks import noveltybench, retention
from calibft.eval.runner import item_seed
from calibft.lm import Checkpoint, HFBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, load_average, machine_info, write_json  # noqa: E402

MODEL = "smollm2-135m"


def gsm8k_rows(count: int) -> list[dict]:
    return [
        {
            "question": f"Tom has {i} apples and buys {2 * i + 3} more. How many?",
            "answer": f"{i} + {2 * i + 3} = {3 * i + 3}\n#### {3 * i + 3}",
            "input_formatted": f"Question: Tom has {i} apples and buys {2 * i + 3} more. How "
            "many apples does he have now? Think step by step.\nAnswer:",
        }
        for i in range(count)
    ]


def mmlu_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        choices = [str(i + 7 + k) for k in range(4)]
        rows.append(
            {
                "question": f"What is {i} + 7?",
                "subject": "elementary_mathematics",
                "choices": choices,
                "answer": i % 4,
                "input_formatted": f"What is {i} + 7?\n"
                + "".join(f"{'ABCD'[k]}. {c}\n" for k, c in enumerate(choices))
                + "Answer:",
            }
        )
    return rows


def write_data(directory: Path) -> Path:
    """tinyGSM8k and tinyMMLU files of 100 rows (`limit` picks the first N)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tinyGSM8k", gsm8k_rows(100)), ("tinyMMLU", mmlu_rows(100))):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def timed(module, lm, items, config, state, batch_items: int) -> tuple[list[dict], float]:
    """The records of `items` as the runner makes them, and the seconds they took."""
    seeds = [item_seed(0, item.key) for item in items]
    start = time.perf_counter()
    if batch_items == 1:
        records = [
            module.run_item(lm, item, config, state, s)
            for item, s in zip(items, seeds, strict=True)
        ]
    else:
        records = []
        for i in range(0, len(items), batch_items):
            records += module.run_batch(
                lm, items[i : i + batch_items], config, state, seeds[i : i + batch_items]
            )
    return json.loads(json.dumps(records)), time.perf_counter() - start


def part1(args, data: Path) -> list[dict]:
    backend = HFBackend(MODEL, [Checkpoint("base")], device="cpu", dtype="float32")
    lm = backend.session(Checkpoint("base"))
    workloads = [
        (
            "greedy GSM8K generation",
            retention,
            retention.Config(
                tasks=["tiny_gsm8k_strict"],
                data=str(data),
                limit=args.rows,
                max_new_tokens=args.tokens,
            ),
        ),
        (
            "NoveltyBench 10-sample generation",
            noveltybench,
            noveltybench.Config(
                splits=["curated"],
                per_split=args.prompts,
                samples=10,
                max_new_tokens=args.tokens,
                classifier="none",
                reward_model="none",
            ),
        ),
        (
            "MC log-likelihood scoring",
            retention,
            retention.Config(tasks=["tiny_mmlu"], data=str(data), limit=args.rows),
        ),
    ]
    rows = []
    for label, module, config in workloads:
        items = module.items(config)
        state = module.setup(config, items) if hasattr(module, "setup") else None
        module.run_item(lm, items[0], config, state, 0)  # warm-up
        one, one_s = timed(module, lm, items, config, state, 1)
        many, many_s = timed(module, lm, items, config, state, args.batch_items)
        row = {
            "workload": label,
            "items": len(items),
            "one_at_a_time_items_per_s": len(items) / one_s,
            "batched_items_per_s": len(items) / many_s,
            "speedup": one_s / many_s,
            "records_identical": one == many,
        }
        if "logprobs" in one[0]:  # scores of a padded batch differ by float rounding only
            row["max_logprob_difference"] = max(
                abs(a - b)
                for r, q in zip(one, many, strict=True)
                for a, b in zip(r["logprobs"], q["logprobs"], strict=True)
            )
            row["same_argmax"] = [r["raw_correct"] for r in one] == [q["raw_correct"] for q in many]
        print(row, flush=True)
        rows.append(row)
    return rows


def part2(args, data: Path) -> dict:
    base = [
        "-m",
        "calibft",
        "eval",
        "retention",
        "--tasks",
        "tiny_mmlu",
        "--data",
        str(data),
        "--limit",
        str(args.sharded),
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--no-plots",
        "--no-progress",
    ]
    launchers = {
        "1 process": [sys.executable],
        "torchrun x 2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    }
    runs, caches = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, launcher in launchers.items():
            out = Path(tmp) / label.replace(" ", "_")
            start = time.perf_counter()
            proc = subprocess.run(
                [*launcher, *base, "--output", str(out)], capture_output=True, text=True
            )
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            caches[label] = {
                str(p.relative_to(out)): p.read_text() for p in (out / "cache").rglob("*.json")
            }
            runs[label] = {"wall_s": wall, "records": len(caches[label])}
            print(label, runs[label], flush=True)
    return {
        "command": "calibft eval retention --tasks tiny_mmlu (synthetic rows)",
        "runs": runs,
        "speedup": runs["1 process"]["wall_s"] / runs["torchrun x 2"]["wall_s"],
        "records_identical": caches["1 process"] == caches["torchrun x 2"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--batch-items", type=int, default=16)
    args = parser.parse_args()
    args.rows, args.prompts, args.tokens, args.sharded = (
        (8, 4, 8, 20) if args.quick else (32, 4, 16, 40)
    )
    output = args.output or default_output("bench_batch", args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data")
        batched = part1(args, data)
        sharded = part2(args, data)
    write_json(
        output,
        {
            "machine": machine_info(),
            "load_average": load_average(),
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "model": MODEL,
            "batch_items": args.batch_items,
            "batched": batched,
            "sharded": sharded,
        },
    )
    print(output)


if __name__ == "__main__":
    main()
