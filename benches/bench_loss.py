"""Fused sparse-target KL vs the dense formula: time (forward + backward) and peak memory.

Implementations, on the same inputs (hidden states at the supervised positions, a frozen LM head,
digit-level targets of 11 children per position, 8 positions per example):
  fused     calibft.losses.fused_sparse_kl (chunked LM head + KL; gradients formed in the forward)
  dense     calibft.losses.dense_sparse_kl on the full logits hidden @ W^T (the reference formula)
  compiled  torch.compile of that dense formula (LM-head product included); if compiling fails on
            this machine, the error string is recorded instead of a figure
  matmuls   the two matrix products alone (logits, and the gradient through the frozen head), in
            one block: the time floor of any exact float32 implementation, fused or dense
  fused_chunkN  fused_sparse_kl with chunk_size=N instead of its default (full mode: N=512). The
            default on CPU is a quarter of the positions within 256..512 rows: thinner chunks
            re-read the whole LM head per chunk and turn memory-bound.

Each (case, implementation) runs in a fresh child process. One warm-up pass (which also compiles),
then the peak-RSS mark is reset (/proc/self/clear_refs) and the working memory of a pass is
measured: the process's peak RSS during the pass minus its RSS before it (inputs, LM head and
targets excluded). glibc's mmap threshold is pinned so that freed large buffers go back to the OS
instead of hiding in the heap between passes. Time: median of `--repeats` passes (3; 1 in quick
mode). The two largest cases (a pass takes minutes on 2 cores) get one timed pass and no warm-up,
except the compiled variant's compiling pass.

    python benches/bench_loss.py [--quick] [--output FILE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    current_rss_mib,
    default_output,
    format_table,
    machine_info,
    run_child,
    write_json,
)  # noqa: E402

# (vocab, hidden size, positions): SmolLM2's 49152 x 576 and Qwen3's 151936 x 1024 heads.
HIDDEN = {49152: 576, 151936: 1024}
FULL_CASES = [(v, HIDDEN[v], p) for v in (49152, 151936) for p in (512, 4096)]
QUICK_CASES = [(49152, 576, 128)]
IMPLS = ("fused", "dense", "compiled", "matmuls")
FULL_FUSED_CHUNKS = (512,)
CHILDREN = 11  # a digit-level trie node: ten digits and the end token
POSITIONS_PER_EXAMPLE = 8
TARGET_MEMORY_RATIO = 5.0  # dense working memory / fused working memory
TARGET_SPEEDUP = 1.5  # dense seconds / fused seconds, on CPU
LARGE_CASE = 49152 * 576 * 4096  # positions x vocab x hidden above which a case gets a single pass


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_inputs(vocab: int, hidden_size: int, positions: int) -> tuple[Any, Any, Any, Any]:
    import numpy as np
    import torch

    from calibft.losses import SparseTargets, example_weights

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=gen).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).div_(
        hidden_size**0.5
    )  # frozen head (LoRA)
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(positions):
        probs = rng.dirichlet(np.ones(CHILDREN))
        parts.append(
            (
                np.array([0, CHILDREN]),
                rng.choice(vocab, CHILDREN, replace=False).astype(np.int32),
                probs,
            )
        )
    targets = SparseTargets.from_csr(parts).to("cpu")
    weights = example_weights(
        [POSITIONS_PER_EXAMPLE] * (positions // POSITIONS_PER_EXAMPLE)
    ).float()
    return hidden, weight, targets, weights


def run_case(
    impl: str, vocab: int, hidden_size: int, positions: int, repeats: int, warmup: bool
) -> dict[str, Any]:
    import torch

    from calibft.losses import dense_sparse_kl, fused_sparse_kl

    hidden, weight, targets, weights = make_inputs(vocab, hidden_size, positions)
    if impl == "fused" or impl.startswith("fused_chunk"):
        chunk_size = int(impl.removeprefix("fused_chunk")) if impl != "fused" else None

        def loss_fn(h: Any) -> Any:
            return fused_sparse_kl(h, weight, targets, weights, chunk_size=chunk_size)
    elif impl == "dense":

        def loss_fn(h: Any) -> Any:
            return dense_sparse_kl(h @ weight.T, targets, weights)
    elif impl == "compiled":
        loss_fn = torch.compile(lambda h: dense_sparse_kl(h @ weight.T, targets, weights))
    elif impl == "matmuls":
        # Only the two products every exact implementation performs: the logits, and the
        # gradient through the frozen head (sum's gradient is all ones).
        def loss_fn(h: Any) -> Any:
            return (h @ weight.T).sum()
    else:
        raise ValueError(f"impl must be one of {IMPLS} or fused_chunkN, got {impl!r}")

    def step() -> float:
        hidden.grad = None
        loss = loss_fn(hidden)
        loss.backward()
        return float(loss.detach())

    row: dict[str, Any] = {
        "impl": impl,
        "vocab": vocab,
        "hidden": hidden_size,
        "positions": positions,
    }
    first_pass_s = None
    if warmup or impl == "compiled":
        start = time.perf_counter()
        try:
            step()  # warm-up (and compilation)
        except Exception as err:  # noqa: BLE001 -- torch.compile may fail on a machine without a compiler
            if impl != "compiled":
                raise
            return {**row, "error": f"{type(err).__name__}: {err}"[:2000]}
        first_pass_s = time.perf_counter() - start
    reset = _reset_peak_rss()
    rss_before = current_rss_mib()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        if i == 0:  # the working memory of one pass (the later ones reuse nothing: same peak)
            row["peak_mib"] = _peak_rss_mib() - rss_before if reset else None
    row.update(
        {
            "warmup": first_pass_s is not None,
            "first_pass_s": first_pass_s,
            "repeats": repeats,
            "rss_before_mib": rss_before,
            "seconds": statistics.median(times),
            "loss": loss,
            "grad_hidden_norm": float(hidden.grad.norm()),
        }
    )
    row["torch_threads"] = torch.get_num_threads()
    return row


def summarize(case_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of every implementation vs dense in one case, and the targets for fused."""
    dense = case_rows["dense"]
    out: dict[str, Any] = {"vocab": dense["vocab"], "positions": dense["positions"]}
    for impl, row in case_rows.items():
        if "error" in row:
            out[impl] = {"error": row["error"]}
            continue
        out[impl] = {
            "seconds": row["seconds"],
            "peak_mib": row["peak_mib"],
            "speedup_vs_dense": dense["seconds"] / row["seconds"],
            "memory_ratio_vs_dense": (dense["peak_mib"] / row["peak_mib"])
            if row["peak_mib"]
            else None,
            "loss_abs_diff_vs_dense": abs(row["loss"] - dense["loss"]),
            "grad_norm_rel_diff_vs_dense": abs(row["grad_hidden_norm"] - dense["grad_hidden_norm"])
            / dense["grad_hidden_norm"],
        }
        ratio = out[impl]["memory_ratio_vs_dense"]
        out[impl]["meets_targets"] = (
            ratio is not None
            and ratio >= TARGET_MEMORY_RATIO
            and out[impl]["speedup_vs_dense"] >= TARGET_SPEEDUP
        )
    memory_ratio = out["fused"]["memory_ratio_vs_dense"]
    out["target_met_memory"] = memory_ratio is not None and memory_ratio >= TARGET_MEMORY_RATIO
    out["target_met_speed"] = out["fused"]["speedup_vs_dense"] >= TARGET_SPEEDUP
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke mode: one case, 49152 x 128 positions"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benches/results/bench_loss[-quick].json)"
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument(
        "--fused-chunks",
        nargs="*",
        type=int,
        help="also run fused with these chunk sizes "
        f"(full default: {list(FULL_FUSED_CHUNKS)}; quick: none)",
    )
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()
    if args.case:
        impl, vocab, hidden_size, positions, repeats, warmup = args.case
        print(
            json.dumps(
                run_case(
                    impl, int(vocab), int(hidden_size), int(positions), int(repeats), warmup == "1"
                )
            )
        )
        return
    if "dense" not in args.impls or "fused" not in args.impls:
        parser.error("--impls must include fused and dense (the ratios are against dense)")
    cases = QUICK_CASES if args.quick else FULL_CASES
    chunks = (
        args.fused_chunks
        if args.fused_chunks is not None
        else ([] if args.quick else list(FULL_FUSED_CHUNKS))
    )
    impls = list(args.impls) + [f"fused_chunk{c}" for c in chunks]
    output = args.output or default_output("bench_loss", args.quick)
    # Fixed mmap threshold: large freed buffers are unmapped at once, so a pass's peak is its own.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))

    rows, summaries = [], []
    for vocab, hidden_size, positions in cases:
        # Passes of the large cases take minutes on 2 cores: one timed pass and no warm-up (the
        # compiled variant always gets its compiling pass first).
        large = positions * vocab * hidden_size > LARGE_CASE
        repeats = args.repeats or (1 if args.quick or large else 3)
        warmup = not large
        case_rows = {}
        for impl in impls:
            row, peak_rss = run_child(
                [
                    __file__,
                    "--case",
                    impl,
                    str(vocab),
                    str(hidden_size),
                    str(positions),
                    str(repeats),
                    "1" if warmup else "0",
                ]
            )
            row["process_peak_rss_mib"] = peak_rss
            case_rows[impl] = row
            rows.append(row)
            shown = row.get("error") or f"{row['seconds']:.3f} s, {row['peak_mib']:.0f} MiB"
            print(f"  V={vocab} P={positions} {impl}: {shown}", flush=True)
        summaries.append(summarize(case_rows))

    diffs = [s["fused"]["loss_abs_diff_vs_dense"] for s in summaries]
    compiled_diffs = [
        s["compiled"]["loss_abs_diff_vs_dense"]
        for s in summaries
        if "compiled" in s and "error" not in s["compiled"]
    ]
    compile_errors = sorted({r["error"] for r in rows if "error" in r})
    write_json(
        output,
        {
            "bench": "loss",
            "mode": "quick" if args.quick else "full",
            "machine": machine_info(),
            "children_per_position": CHILDREN,
            "impls": impls,
            "targets": {
                "memory_ratio_vs_dense": TARGET_MEMORY_RATIO,
                "speedup_vs_dense": TARGET_SPEEDUP,
            },
            "rows": rows,
            "cases": summaries,
            "max_abs_loss_diff_fused_vs_dense": max(diffs),
            "max_abs_loss_diff_compiled_vs_dense": max(compiled_diffs) if compiled_diffs else None,
            "compile_error": compile_errors[0] if compile_errors else None,
            "targets_met": {
                "memory": all(s["target_met_memory"] for s in summaries),
                "speed": all(s["target_met_speed"] for s in summaries),
            },
        },
    )
    table = []
    for s in summaries:
        for impl in impls:
            entry = s[impl]
            table.append({"vocab": s["vocab"], "positions": s["positions"], "impl": impl, **entry})
    print(
        format_table(
            table,
            [
                ("vocab", "V"),
                ("positions", "positions"),
                ("impl", "impl"),
                ("seconds", "fwd+bwd s"),
                ("peak_mib", "peak MiB"),
                ("speedup_vs_dense", "speedup vs dense"),
                ("memory_ratio_vs_dense", "memory ratio vs dense"),
                ("meets_targets", "meets targets"),
                ("error", "error"),
            ],
        )
    )
    print(f"max |loss fused - loss dense| {max(diffs):.2e}; wrote {output}")


if __name__ == "__main__":
    main()
