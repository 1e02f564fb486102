"""W1 scoring: calibft.eval.metrics.w1_batch vs a loop of scipy.stats.wasserstein_distance.

Both compute the structured benchmark's sample W1 (docs/benchmarks/structured.md §3): the mean
|x_(i) - F^-1((i - 0.5)/N)| between the N sorted samples and the law's quantiles
(wasserstein_distance between the samples and those N quantiles is the same quantity). The
quantile step is timed apart from the scoring: w1_batch makes one batched SciPy ppf call per
family, the baseline one call per prompt (same values).

    python benches/bench_w1.py [--quick] [--output FILE] [--prompts 1000] [--samples 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, format_table, machine_info, write_json  # noqa: E402

TARGET_SPEEDUP = 20.0


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(result of the last call, median seconds over `repeats` calls)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def make_inputs(prompts: int, samples: int, seed: int) -> tuple[list[Any], np.ndarray]:
    """`prompts` training specs (cycling through the split) and `samples` draws from each law,
    one row per prompt (how evaluation holds N generations per prompt)."""
    from calibft import frozen_law, splits

    train = splits()["train"]
    specs = [train[i % len(train)] for i in range(prompts)]
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [
            np.asarray(
                frozen_law(s.family, s.params).rvs(size=samples, random_state=rng), dtype=np.float64
            )
            for s in specs
        ]
    )
    return specs, draws


def scipy_quantiles(specs: list[Any], samples: int) -> list[np.ndarray]:
    """The baseline's quantile step: one SciPy ppf call per prompt."""
    from calibft import frozen_law

    levels = (np.arange(samples) + 0.5) / samples
    return [frozen_law(s.family, s.params).ppf(levels) for s in specs]


def calibft_scoring(draws: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """The Rust batch kernel that w1_batch calls after its quantile step."""
    from calibft import _core

    offsets = np.arange(draws.shape[0] + 1, dtype=np.int64) * draws.shape[1]
    return _core.sample_w1_batch(offsets, draws.ravel(), quantiles.ravel())


def scipy_scoring(draws: np.ndarray, quantiles: list[np.ndarray]) -> np.ndarray:
    from scipy.stats import wasserstein_distance

    return np.array([wasserstein_distance(d, q) for d, q in zip(draws, quantiles)])


def run(prompts: int, samples: int, repeats: int, seed: int) -> dict[str, Any]:
    from calibft import w1_batch

    specs, draws = make_inputs(prompts, samples, seed)
    pairs = [(s.family, s.params) for s in specs]

    ours_total, ours_total_s = timed(lambda: w1_batch(draws, pairs), repeats)
    scipy_q, scipy_q_s = timed(lambda: scipy_quantiles(specs, samples), repeats)
    stacked_q = np.stack(scipy_q)  # [prompts, samples], as w1_batch holds them
    ours_score, ours_score_s = timed(lambda: calibft_scoring(draws, stacked_q), repeats)
    scipy_score, scipy_score_s = timed(lambda: scipy_scoring(draws, scipy_q), repeats)
    ours_q_s = max(ours_total_s - ours_score_s, 0.0)  # w1_batch = batched quantiles + the kernel

    scipy_total_s = scipy_q_s + scipy_score_s
    return {
        "prompts": prompts,
        "samples_per_prompt": samples,
        "families": len({s.family for s in specs}),
        "repeats": repeats,
        "seed": seed,
        "calibft": {"w1_batch_s": ours_total_s, "quantiles_s": ours_q_s, "scoring_s": ours_score_s},
        "scipy": {"quantiles_s": scipy_q_s, "scoring_s": scipy_score_s, "total_s": scipy_total_s},
        "speedup_scoring": scipy_score_s / ours_score_s,
        "speedup_quantiles": scipy_q_s / ours_q_s if ours_q_s > 0 else None,
        "speedup_end_to_end": scipy_total_s / ours_total_s,
        "quantile_share_of_w1_batch": ours_q_s / ours_total_s,
        "max_abs_diff": float(np.max(np.abs(ours_total - scipy_score))),
        "max_abs_diff_scoring_only": float(np.max(np.abs(ours_score - scipy_score))),
        "target_speedup": TARGET_SPEEDUP,
        "target_met_scoring": scipy_score_s / ours_score_s >= TARGET_SPEEDUP,
        "target_met_end_to_end": scipy_total_s / ours_total_s >= TARGET_SPEEDUP,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke mode: 50 prompts x 200 samples"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benches/results/bench_w1[-quick].json)"
    )
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = args.prompts or (50 if args.quick else 1000)
    samples = args.samples or (200 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 5)
    output = args.output or default_output("bench_w1", args.quick)

    result = run(prompts, samples, repeats, args.seed)
    write_json(
        output,
        {
            "bench": "w1",
            "mode": "quick" if args.quick else "full",
            "machine": machine_info(with_gpu=False),
            **result,
        },
    )
    rows = [
        {
            "impl": "calibft w1_batch",
            "quantiles_s": result["calibft"]["quantiles_s"],
            "scoring_s": result["calibft"]["scoring_s"],
            "total_s": result["calibft"]["w1_batch_s"],
        },
        {
            "impl": "scipy wasserstein_distance loop",
            "quantiles_s": result["scipy"]["quantiles_s"],
            "scoring_s": result["scipy"]["scoring_s"],
            "total_s": result["scipy"]["total_s"],
        },
    ]
    print(f"W1 of {samples} samples for {prompts} prompts (median of {repeats})")
    print(
        format_table(
            rows,
            [
                ("impl", "implementation"),
                ("quantiles_s", "quantiles s"),
                ("scoring_s", "scoring s"),
                ("total_s", "total s"),
            ],
        )
    )
    print(
        f"speedup: scoring {result['speedup_scoring']:.1f}x, "
        f"end to end {result['speedup_end_to_end']:.2f}x; "
        f"max |diff| {result['max_abs_diff']:.2e}"
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
