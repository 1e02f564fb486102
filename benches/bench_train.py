"""Training throughput on SmolLM2-135M (CPU): soft (trie KL) and hard (CE) optimizer steps.

Uses calibft.train's own machinery: the paper-soft / paper-hard presets (TrainConfig), its prompt
selection, DataPlan, ExampleBuilder, LoRA wrapping and CompletionLoss (fused loss), batch 8. Every
step is timed in parts:
  data       ExampleBuilder.batch (sample a path per example, read its targets, pad) and the
             target preparation (SparseTargets and inputs moved to the device)
  forward    CompletionLoss forward: decoder + fused LM-head loss
  backward   loss.backward()
  optimizer  gradient clipping, AdamW step, zero_grad
The figure of interest is the share of the step spent outside the model's forward/backward in
data + target preparation (target <= 5 %). With --retention-weight, every micro-batch is stepped
twice in the same process, without and with the retention term (docs/method.md §9: replay rows in
every step, every 16th shipped replay prompt), in alternating order, and the extra step time is
reported (target <= 30 %); the one-time replay build (greedy continuations + base targets) is
timed apart. The target build
(output spaces + tries of the prompts used) is timed too, and extrapolated to all 1988 training
prompts.

Each method runs in a fresh child process (its own model copy, LoRA and peak RSS).

    python benches/bench_train.py [--quick] [--output FILE] [--steps N] [--warmup N]
        [--methods soft hard] [--retention-weight LAMBDA]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, format_table, machine_info, run_child, write_json  # noqa: E402

MODEL = "smollm2-135m"
METHODS = ("soft", "hard")
QUICK_FAMILIES = ("gaussian", "binomial")
TARGET_DATA_SHARE = 0.05
TARGET_RETENTION_OVERHEAD = 0.30
REPLAY_STRIDE = 16
ALL_TRAIN_PROMPTS = 1988


def run_method(
    method: str,
    steps: int,
    warmup: int,
    families: list[str],
    prompts_per_family: int,
    retention_weight: float = 0.0,
) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import torch

    from calibft.config import build
    from calibft.lm.load import load_model_and_tokenizer
    from calibft.train.config import TrainConfig, preset_values
    from calibft.train.data import DataPlan, ExampleBuilder, prepare_targets, select_prompts
    from calibft.train.loop import trainable_module
    from calibft.train.retention import (
        load_or_build_replay,
        read_prompts,
        replay_indices,
        with_replay,
    )

    config = build(
        TrainConfig,
        preset_values(f"paper-{method}"),
        {
            "model": MODEL,
            "families": families,
            "prompts_per_family": prompts_per_family,
            "seed": 0,
            "retention_weight": retention_weight,
        },
    )
    torch.manual_seed(config.seed)
    prompts = select_prompts(config)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(config.model)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    prompt_ids, tries = prepare_targets(config, tokenizer, prompts, False)
    target_build_s = time.perf_counter() - start

    module = trainable_module(model, config)
    replay, replay_build_s = None, 0.0
    if retention_weight:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            # Step time depends on the rows per step, not on the size of the replay set: every
            # REPLAY_STRIDE-th shipped prompt keeps the one-time build short on a CPU.
            subset = Path(scratch) / "replay.txt"
            subset.write_text("\n".join(read_prompts([])[::REPLAY_STRIDE]) + "\n")
            config.retention_data = [str(subset)]
            replay = load_or_build_replay(config, module.lm, tokenizer, Path(scratch), False)
        replay_build_s = time.perf_counter() - start
    plan = DataPlan.for_run(config, prompts, rank=0, world_size=1)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    builder = ExampleBuilder(config, prompt_ids, tries, tokenizer.pad_token_id or 0)
    device = torch.device("cpu")

    planned = [
        (epoch, mb) for epoch in range(config.epochs) for step in plan.steps(epoch) for mb in step
    ]
    if len(planned) < warmup + steps:
        raise ValueError(
            f"only {len(planned)} micro-batches for {warmup} warm-up + {steps} timed steps; "
            "add prompts"
        )

    def timed_step(index: int, epoch: int, examples: list[int], use_replay: bool) -> dict:
        t0 = time.perf_counter()
        batch = builder.batch(plan, epoch, examples)
        if use_replay:
            chosen = replay_indices(len(replay), 0, index, 0, 1, config.retention_batch_size)
            batch = with_replay(batch, [replay[i] for i in chosen], builder.pad_id)
        inputs = batch.inputs(device)
        t1 = time.perf_counter()
        out = module(*inputs)
        loss = out[0] + retention_weight * out[1] if use_replay else out
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if not np.isfinite(float(loss)):
            raise RuntimeError(f"non-finite loss at step {index}")
        return {
            "data_s": t1 - t0,
            "forward_s": t2 - t1,
            "backward_s": t3 - t2,
            "optimizer_s": t4 - t3,
            "step_s": t4 - t0,
            "tokens": batch.num_tokens,
            "completion_tokens": int(batch.positions.numel()),
            "width": int(batch.input_ids.shape[1]),
            "loss": float(loss),
        }

    # With the retention term, every micro-batch is stepped twice in this process, without and
    # with replay rows, in alternating order: load changes on a shared machine hit both alike.
    records, plain_steps = [], []
    for index, (epoch, examples) in enumerate(planned[: warmup + steps]):
        variants = [False, True] if replay else [False]
        for use_replay in variants if index % 2 == 0 else variants[::-1]:
            record = timed_step(index, epoch, examples, use_replay)
            if index >= warmup:
                (records if use_replay or not replay else plain_steps).append(record)

    parts = ("data_s", "forward_s", "backward_s", "optimizer_s", "step_s")
    total = {key: sum(r[key] for r in records) for key in parts}
    tokens = sum(r["tokens"] for r in records)
    completion_tokens = sum(r["completion_tokens"] for r in records)
    mean_step_s = total["step_s"] / len(records)
    # A full paper run over all training prompts: the one-time build against every step it serves.
    per_prompt_build_s = target_build_s / len(prompts)
    full_build_s = per_prompt_build_s * ALL_TRAIN_PROMPTS
    full_steps = -(-ALL_TRAIN_PROMPTS * config.repeats // config.batch_size) * config.epochs
    plain_step_s = statistics.fmean(r["step_s"] for r in plain_steps) if replay else None
    return {
        "method": method,
        "retention_weight": retention_weight,
        "plain_mean_step_s": plain_step_s,
        "retention_overhead": mean_step_s / plain_step_s - 1 if plain_step_s else None,
        # Per micro-batch, the two steps taken back to back: robust to load that drifts.
        "retention_overhead_paired_median": statistics.median(
            r["step_s"] / p["step_s"] - 1 for r, p in zip(records, plain_steps, strict=True)
        )
        if replay
        else None,
        "retention_batch_size": config.retention_batch_size if replay else 0,
        "replay_examples": len(replay or []),
        "replay_build_s": replay_build_s,
        "model": MODEL,
        "max_bins": config.max_bins,
        "decimals": config.decimals,
        "repeats": config.repeats,
        "batch_size": config.batch_size,
        "families": sorted({spec.family for spec in prompts}),
        "prompts": len(prompts),
        "warmup_steps": warmup,
        "steps": len(records),
        "torch_threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "target_build_s": target_build_s,
        "target_build_s_per_prompt": per_prompt_build_s,
        "target_build_s_extrapolated_1988": full_build_s,
        "full_run_steps": full_steps,
        "target_build_share_of_full_run": full_build_s / (full_build_s + full_steps * mean_step_s),
        "seconds": total,
        "mean_step_s": mean_step_s,
        "median_step_s": statistics.median(r["step_s"] for r in records),
        "tokens": tokens,
        "completion_tokens": completion_tokens,
        "tokens_per_s": tokens / total["step_s"],
        "completion_tokens_per_s": completion_tokens / total["step_s"],
        "data_share": total["data_s"] / total["step_s"],
        "optimizer_share": total["optimizer_s"] / total["step_s"],
        "forward_backward_share": (total["forward_s"] + total["backward_s"]) / total["step_s"],
        "target_data_share": TARGET_DATA_SHARE,
        "target_met": total["data_s"] / total["step_s"] <= TARGET_DATA_SHARE,
        "per_step": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke mode: 2 steps, 2 families, no warm-up"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benches/results/bench_train[-quick].json)"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per method (full: 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (full: 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--retention-weight",
        type=float,
        default=0.0,
        help="also time each method with this retention weight (λ > 0) against λ = 0",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)  # internal: one method
    args = parser.parse_args()
    if args.child:
        method, steps, warmup, families, per_family, weight = args.child
        chosen = [f for f in families.split(",") if f]
        row = run_method(method, int(steps), int(warmup), chosen, int(per_family), float(weight))
        print(json.dumps(row))
        return
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    # Quick: 2 families x 8 prompts. Full: all 24 families, 4 prompts each (96 prompts), enough
    # for 11 batches of 8 in a family-balanced order.
    families = ",".join(QUICK_FAMILIES) if args.quick else ""
    per_family = 8 if args.quick else 4
    output = args.output or default_output("bench_train", args.quick)

    rows = []
    for method in args.methods:
        row, peak = run_child(
            [
                __file__,
                "--child",
                method,
                str(steps),
                str(warmup),
                families,
                str(per_family),
                str(args.retention_weight),
            ]
        )
        row["peak_rss_mib"] = peak
        rows.append(row)
        print(
            f"  {method}: {row['tokens_per_s']:.0f} tokens/s, "
            f"data share {100 * row['data_share']:.2f} %, "
            f"target build {row['target_build_s']:.2f} s for {row['prompts']} prompts",
            flush=True,
        )
    overheads = {r["method"]: r["retention_overhead"] for r in rows if r["retention_weight"]}
    for row in rows:
        if row["retention_weight"]:
            print(
                f"  {row['method']} retention term: +{100 * row['retention_overhead']:.1f} % "
                f"mean step time (paired median +"
                f"{100 * row['retention_overhead_paired_median']:.1f} %); replay build "
                f"{row['replay_build_s']:.1f} s for {row['replay_examples']} prompts",
                flush=True,
            )
    write_json(
        output,
        {
            "bench": "train",
            "mode": "quick" if args.quick else "full",
            "machine": machine_info(),
            "target_data_share": TARGET_DATA_SHARE,
            "methods": rows,
            "targets_met": all(r["target_met"] for r in rows),
            "retention_overhead": overheads,
            "target_retention_overhead": TARGET_RETENTION_OVERHEAD,
            "retention_target_met": all(v <= TARGET_RETENTION_OVERHEAD for v in overheads.values()),
        },
    )
    table = [{**r, **{k: r["seconds"][k] / r["steps"] for k in r["seconds"]}} for r in rows]
    print(
        format_table(
            table,
            [
                ("method", "method"),
                ("retention_weight", "λ"),
                ("max_bins", "bins"),
                ("steps", "steps"),
                ("step_s", "step s"),
                ("data_s", "data s"),
                ("forward_s", "fwd s"),
                ("backward_s", "bwd s"),
                ("optimizer_s", "optim s"),
                ("tokens_per_s", "tokens/s"),
                ("data_share", "data share"),
                ("target_build_s", "target build s"),
                ("prompts", "prompts"),
                ("target_met", "target met"),
            ],
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
