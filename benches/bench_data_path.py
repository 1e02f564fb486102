"""Data path: output spaces + prefix tries for every training prompt, per tokenizer and bin count.

Every configuration runs in a fresh child process, so its peak RSS (wait4's ru_maxrss) is its own;
all tries stay alive until the end (training holds them all). Modes:
  separate   build_output_spaces for all prompts, then build_tries (spaces kept alive too)
  chunked    the same per chunk of 64 prompts, each chunk's spaces freed once its tries exist
  pipelined  calibft.build_spaces_and_tries(keep_spaces=False): SciPy on the next chunk overlaps
             Rust's tries of the previous one (only the total time is meaningful)
Also measured: SciPy+Rust space time per family, and a baseline: a straightforward pure-Python
nested-dict trie (one HF tokenizer call per value) on a sample of prompts, extrapolated to all.

    python benches/bench_data_path.py [--quick] [--output FILE] [--tokenizers ...] [--bins ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
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

TOKENIZERS = ("smollm2", "qwen3", "llama3")
FULL_BINS = (1001, 16384, 65536)
# Above this many bins the spaces of all prompts at once would not leave room for the tries.
CHUNK_ABOVE_BINS = 16384
CHUNK = 64
TARGETS = {1001: {"seconds": 3.0}, 16384: {"seconds": 30.0, "peak_rss_mib": 3 * 1024}}


def load_tokenizer(name: str) -> Any:
    if name == "smollm2":
        from calibft.lm.load import load_tokenizer as load_model_tokenizer

        return load_model_tokenizer("smollm2-135m")
    from calibft import assets

    loaders = {"qwen3": assets.qwen3_tokenizer, "llama3": assets.llama3_tokenizer}
    if name not in loaders:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {name!r}")
    return loaders[name]()


def train_specs(prompts: int | None) -> list[Any]:
    from calibft import splits

    specs = splits()["train"]
    return specs if prompts is None else _evenly(specs, prompts)


def _evenly(items: list[Any], n: int) -> list[Any]:
    """n items spread over the list (every family represented), not its first n."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]


def child_build(tokenizer: str, max_bins: int, mode: str, prompts: int | None) -> dict[str, Any]:
    import calibft

    specs = train_specs(prompts)
    start = time.perf_counter()
    hf = load_tokenizer(tokenizer)
    loaded = time.perf_counter()
    tok = calibft.TrieTokenizer.from_hf(hf)
    prepared = time.perf_counter()
    rss_before = current_rss_mib()
    spaces_s = tries_s = None
    spaces: list[Any] = []
    start_build = time.perf_counter()
    if mode == "separate":
        spaces = calibft.build_output_spaces(specs, max_bins=max_bins)
        spaces_s = time.perf_counter() - start_build
        tries = calibft.build_tries(spaces, tok)
        tries_s = time.perf_counter() - start_build - spaces_s
    elif mode == "chunked":
        spaces_s = tries_s = 0.0
        tries = []
        for i in range(0, len(specs), CHUNK):
            t0 = time.perf_counter()
            chunk = calibft.build_output_spaces(specs[i : i + CHUNK], max_bins=max_bins)
            t1 = time.perf_counter()
            tries.extend(calibft.build_tries(chunk, tok))
            spaces_s += t1 - t0
            tries_s += time.perf_counter() - t1
            del chunk
    elif mode == "pipelined":
        _, tries = calibft.build_spaces_and_tries(
            specs, tok, max_bins=max_bins, chunk_size=CHUNK, keep_spaces=False
        )
    else:
        raise ValueError(f"mode must be separate, chunked or pipelined, got {mode!r}")
    total_s = time.perf_counter() - start_build
    return {
        "tokenizer": tokenizer,
        "vocab": len(hf),
        "max_bins": max_bins,
        "mode": mode,
        "prompts": len(specs),
        "load_tokenizer_s": loaded - start,
        "trie_tokenizer_s": prepared - loaded,
        "spaces_s": spaces_s,
        "tries_s": tries_s,
        "total_s": total_s,
        "values": int(sum(t.num_values for t in tries)),
        "trie_nodes": int(sum(t.num_nodes for t in tries)),
        "trie_mib": sum(t.nbytes for t in tries) / 2**20,
        "spaces_alive": len(spaces) > 0,
        "rss_before_build_mib": rss_before,
        "rss_end_mib": current_rss_mib(),
    }


def child_families(max_bins: int, prompts: int | None) -> dict[str, Any]:
    """Space time per family (SciPy CDF/PMF + Rust grid), to see which law dominates."""
    import calibft

    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for spec in train_specs(prompts):
        start = time.perf_counter()
        calibft.build_output_space(spec.family, spec.params, max_bins=max_bins)
        seconds[spec.family] += time.perf_counter() - start
        counts[spec.family] += 1
    rows = [
        {"family": f, "prompts": counts[f], "seconds": s, "ms_per_prompt": 1e3 * s / counts[f]}
        for f, s in sorted(seconds.items(), key=lambda kv: -kv[1])
    ]
    return {"max_bins": max_bins, "total_s": sum(seconds.values()), "families": rows}


def python_trie(values: list[str], probs: Any, hf: Any, chat: Any, prompt: str) -> tuple[dict, int]:
    """Baseline: tokenize prefix+value with the HF tokenizer, insert into nested dicts, then turn
    child masses into conditional probabilities. Returns (root, node count incl. root)."""
    prefix = chat.render(prompt)
    skip = len(chat.prompt_ids(prompt))
    root: dict[int, list] = {}
    nodes = 1
    for value, p in zip(values, probs.tolist()):
        ids = hf(prefix + value, add_special_tokens=False)["input_ids"][skip:] + [chat.end_token_id]
        node = root
        for token in ids:
            entry = node.get(token)
            if entry is None:
                entry = node[token] = [0.0, {}]
                nodes += 1
            entry[0] += p
            node = entry[1]
    stack = [root]
    while stack:
        node = stack.pop()
        total = sum(entry[0] for entry in node.values())
        for entry in node.values():
            entry[0] /= total
            stack.append(entry[1])
    return root, nodes


def child_baseline(tokenizer: str, max_bins: int, sample: int) -> dict[str, Any]:
    import calibft

    hf = load_tokenizer(tokenizer)
    tok = calibft.TrieTokenizer.from_hf(hf)
    all_spaces = calibft.build_output_spaces(train_specs(None), max_bins=max_bins)
    picked = _evenly(all_spaces, sample)
    rss_before = current_rss_mib()
    start = time.perf_counter()
    kept, nodes = [], 0
    for space in picked:
        root, n = python_trie(space.values, space.probs, hf, tok.chat, space.prompt)
        kept.append(root)
        nodes += n
    seconds = time.perf_counter() - start
    rss_growth = current_rss_mib() - rss_before
    rust_nodes = sum(t.num_nodes for t in calibft.build_tries(picked, tok))
    total_values = sum(len(s) for s in all_spaces)
    sample_values = sum(len(s) for s in picked)
    scale = total_values / sample_values
    return {
        "tokenizer": tokenizer,
        "max_bins": max_bins,
        "sample_prompts": len(picked),
        "sample_values": sample_values,
        "sample_s": seconds,
        "sample_rss_growth_mib": rss_growth,
        "nodes_match_calibft": nodes == rust_nodes,
        "extrapolated_prompts": len(all_spaces),
        "extrapolated_s": seconds * scale,
        "extrapolated_rss_mib": rss_growth * scale,
    }


def run_configs(
    tokenizers: list[str], bins: list[int], prompts: int | None
) -> list[dict[str, Any]]:
    """One child per configuration."""
    rows = []
    for tokenizer in tokenizers:
        for max_bins in bins:
            # Above CHUNK_ABOVE_BINS one chunked run shows the growth; the pipelined twin adds
            # minutes.
            modes = ("chunked",) if max_bins > CHUNK_ABOVE_BINS else ("separate", "pipelined")
            for mode in modes:
                args = [
                    __file__,
                    "--child",
                    "build",
                    tokenizer,
                    str(max_bins),
                    mode,
                    str(prompts or 0),
                ]
                result, peak = run_child(args)
                result["peak_rss_mib"] = peak
                result["targets_met"] = _targets_met(result)
                print(
                    f"  {tokenizer} {max_bins} {mode}: {result['total_s']:.2f} s, {peak:,.0f} MiB",
                    flush=True,
                )
                rows.append(result)
    return rows


def _targets_met(row: dict[str, Any]) -> bool | None:
    target = TARGETS.get(row["max_bins"])
    if target is None or row["prompts"] != 1988:
        return None
    return row["total_s"] <= target["seconds"] and row["peak_rss_mib"] <= target.get(
        "peak_rss_mib", float("inf")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke mode: 20 prompts, 1001 bins, Qwen3 only"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default benches/results/bench_data_path[-quick].json)",
    )
    parser.add_argument("--tokenizers", nargs="+", choices=TOKENIZERS)
    parser.add_argument("--bins", nargs="+", type=int)
    parser.add_argument(
        "--prompts", type=int, help="spread this many training prompts (default all 1988)"
    )
    parser.add_argument("--baseline-sample", type=int, help="prompts for the pure-Python baseline")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            result = child_build(rest[0], int(rest[1]), rest[2], int(rest[3]) or None)
        elif kind == "families":
            result = child_families(int(rest[0]), int(rest[1]) or None)
        else:
            result = child_baseline(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return

    tokenizers = args.tokenizers or (["qwen3"] if args.quick else list(TOKENIZERS))
    bins = args.bins or ([1001] if args.quick else list(FULL_BINS))
    prompts = args.prompts or (20 if args.quick else None)
    sample = args.baseline_sample or (3 if args.quick else 40)
    output = args.output or default_output("bench_data_path", args.quick)

    print("data path: spaces + tries", flush=True)
    rows = run_configs(tokenizers, bins, prompts)
    print("space time per family", flush=True)
    families, _ = run_child([__file__, "--child", "families", str(max(bins)), str(prompts or 0)])
    print("pure-Python baseline", flush=True)
    baselines = []
    for tokenizer in tokenizers:
        baseline, _ = run_child([__file__, "--child", "baseline", tokenizer, "1001", str(sample)])
        ours = next(
            (
                r
                for r in rows
                if r["tokenizer"] == tokenizer and r["max_bins"] == 1001 and r["mode"] == "separate"
            ),
            None,
        )
        if ours is not None and ours["prompts"] == baseline["extrapolated_prompts"]:
            baseline["speedup_vs_calibft_tries"] = baseline["extrapolated_s"] / ours["tries_s"]
            baseline["speedup_vs_calibft_total"] = baseline["extrapolated_s"] / ours["total_s"]
        baselines.append(baseline)

    write_json(
        output,
        {
            "bench": "data_path",
            "mode": "quick" if args.quick else "full",
            "machine": machine_info(with_gpu=False),
            "targets": {str(k): v for k, v in TARGETS.items()},
            "configs": rows,
            "space_time_by_family": families,
            "baseline_pure_python": baselines,
        },
    )
    print(
        format_table(
            rows,
            [
                ("tokenizer", "tokenizer"),
                ("max_bins", "bins"),
                ("mode", "mode"),
                ("spaces_s", "spaces s"),
                ("tries_s", "tries s"),
                ("total_s", "total s"),
                ("trie_nodes", "nodes"),
                ("trie_mib", "tries MiB"),
                ("peak_rss_mib", "peak RSS MiB"),
                ("targets_met", "target met"),
            ],
        )
    )
    print(
        format_table(
            families["families"][:8],
            [
                ("family", "family"),
                ("prompts", "prompts"),
                ("seconds", "s"),
                ("ms_per_prompt", "ms/prompt"),
            ],
        )
    )
    print(
        format_table(
            baselines,
            [
                ("tokenizer", "tokenizer"),
                ("sample_prompts", "sample"),
                ("sample_s", "sample s"),
                ("extrapolated_s", "extrapolated s (1988)"),
                ("extrapolated_rss_mib", "extrapolated MiB"),
                ("speedup_vs_calibft_total", "x vs calibft total"),
                ("nodes_match_calibft", "nodes match"),
            ],
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
