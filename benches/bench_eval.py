"""Cost of exact evaluation of one prompt vs N sampled generations (SmolLM2-135M, CPU by default).

    python benches/bench_eval.py            # 16384-bin prompts, 1000 samples, chunk-size sweep,
                                            # tree packing vs leaf-path batching
    python benches/bench_eval.py --quick    # one 1001-bin prompt, 100 samples (per-1000 cost
                                            # extrapolated); about a minute

Writes benches/results/bench_eval[-quick].json (or --output) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from calibft.chat import ChatFormat
from calibft.eval.benchmarks.structured import DEFAULT_TOLERANCE
from calibft.eval.benchmarks.structured.answers import parse_samples
from calibft.eval.benchmarks.structured.exact import exact_distribution
from calibft.lm import HFSession
from calibft.lm.adapters import peft_wrapping
from calibft.lm.decode import lm_head_logits, prefill, run_decoder
from calibft.lm.layout import TrieLayout
from calibft.lm.load import load_model_and_tokenizer
from calibft.lm.sample import sample_completions
from calibft.lm.tree import tree_hidden_states
from calibft.splits import splits
from calibft.targets import TrieTokenizer, build_output_space, build_trie

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, machine_info, write_json  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@torch.inference_mode()
def leaf_path_seconds(model, state, layout: TrieLayout, trie, num_values: int, batch: int) -> float:
    """The alternative to tree packing: whole value paths batched over the expanded prompt cache
    (shared prefixes recomputed). Returns seconds for `num_values` values."""
    offsets, ids = (np.asarray(a) for a in trie.value_paths())
    start = time.perf_counter()
    for first in range(0, num_values, batch):
        rows = range(first, min(first + batch, num_values))
        paths = [ids[offsets[i] : offsets[i + 1] - 1] for i in rows]  # the end token is never fed
        width = max(len(p) for p in paths)
        tokens = torch.zeros((len(paths), width), dtype=torch.long)
        for r, p in enumerate(paths):
            tokens[r, : len(p)] = torch.from_numpy(p.astype(np.int64))
        cache = state.fresh_cache()
        cache.batch_repeat_interleave(len(paths))
        positions = (state.length + torch.arange(width))[None].expand(len(paths), -1)
        hidden = run_decoder(model, cache, input_ids=tokens, position_ids=positions)
        torch.log_softmax(lm_head_logits(model, hidden.last_hidden_state).float(), dim=-1)
    return time.perf_counter() - start


def _sample_rates(completions, tokenizer, spec, space) -> dict:
    """Sampled valid rate (the structured benchmark's parse rules (docs/benchmarks/structured.md
    §2)) and the share of answers that are exactly a canonical string of the space: the quantity
    the exact pass's valid mass gives without noise."""
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in completions]
    canonical = set(space.values)
    return {
        "sampled_valid_rate": parse_samples(texts, spec.family, spec.params).valid_rate,
        "sampled_canonical_rate": float(np.mean([text in canonical for text in texts])),
    }


def _warm_up(model, state, layout, chat, args) -> None:
    """Pay one-time costs before timing (a process's first exact pass ran ~3 s slower here): one
    chunk of every swept size and a short batch of samples. A pre-order prefix of the internal
    nodes is closed under ancestors, as tree_hidden_states requires."""
    for chunk in args.chunk_sizes:
        for _ in tree_hidden_states(
            model, state, layout, layout.internal[: chunk + 1], chunk_size=chunk
        ):
            pass
    sample_completions(
        model,
        state,
        args.sample_batch_size,
        seed=1,
        end_ids=[chat.end_token_id],
        max_new_tokens=4,
        batch_size=args.sample_batch_size,
    )


def bench_prompt(model, tokenizer, chat, trie_tokenizer, spec, args) -> dict:
    space = build_output_space(
        spec.family, spec.params, decimals=args.decimals, max_bins=args.max_bins
    )
    trie, build_s = _timed(lambda: build_trie(space, trie_tokenizer))
    layout = TrieLayout.from_trie(trie)
    state = prefill(model, chat.prompt_ids(spec.prompt))
    lm = HFSession(model, tokenizer, chat, [chat.end_token_id])
    _warm_up(model, state, layout, chat, args)
    exact_s = {}
    for chunk in args.chunk_sizes:
        result, exact_s[chunk] = _timed(
            lambda chunk=chunk: exact_distribution(lm, state, space, layout, chunk_size=chunk)
        )
    best_chunk = min(exact_s, key=exact_s.get)
    pruned = {}
    for tolerance in args.tolerances:
        got, seconds = _timed(
            lambda tolerance=tolerance: exact_distribution(
                lm, state, space, layout, chunk_size=best_chunk, tolerance=tolerance
            )
        )
        pruned[f"{tolerance:g}"] = {
            "exact_s": seconds,
            "unresolved_mass": got.unresolved_mass,
            "valid_mass": got.valid_mass,
            "normalized_w1": got.normalized_w1,
            "normalized_w1_error": abs(got.normalized_w1 - result.normalized_w1),
        }
    completions, sample_s = _timed(
        lambda: sample_completions(
            model,
            state,
            args.samples,
            seed=0,
            end_ids=[chat.end_token_id],
            max_new_tokens=32,
            batch_size=args.sample_batch_size,
        )
    )
    per_1000 = sample_s * 1000 / args.samples
    for entry in pruned.values():
        entry["over_sampled_1000"] = entry["exact_s"] / per_1000
    row = {
        "family": spec.family,
        "params": spec.params,
        "decimals": args.decimals,
        "max_bins": args.max_bins,
        "values": len(space),
        "trie_nodes": trie.num_nodes,
        "internal_nodes": int(len(layout.internal)),
        "trie_build_s": build_s,
        "exact_s_by_chunk": exact_s,
        "exact_s": exact_s[best_chunk],
        "exact_nodes_per_s": len(layout.internal) / exact_s[best_chunk],
        "exact_valid_mass": result.valid_mass,
        "exact_normalized_w1": result.normalized_w1,
        "pruned_by_tolerance": pruned,
        "samples": args.samples,
        "sample_s": sample_s,
        "sample_tokens": int(sum(len(c) + 1 for c in completions)),
        "sample_s_per_1000": per_1000,
        "generations_per_s": args.samples / sample_s,
        **_sample_rates(completions, tokenizer, spec, space),
        "exact_over_sampled_1000": exact_s[best_chunk] / per_1000,
    }
    if args.leaf_values:
        n = min(args.leaf_values, len(space))
        leaf_s = leaf_path_seconds(model, state, layout, trie, n, batch=64)
        row["leaf_path_s_extrapolated"] = leaf_s * len(space) / n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: one 1001-bin prompt, 100 samples"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benches/results/bench_eval[-quick].json)"
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--max-bins", type=int, help="output-space size of the prompts (default 16384; quick 1001)"
    )
    parser.add_argument(
        "--decimals",
        type=int,
        default=5,
        help="decimals of the output space (default 5, the evaluation space of "
        "docs/benchmarks/structured.md §1; a model trained at d decimals is canonical only at d)",
    )
    parser.add_argument(
        "--samples", type=int, help="sampled generations per prompt (default 1000; quick 100)"
    )
    parser.add_argument(
        "--chunk-sizes",
        nargs="*",
        type=int,
        help="trie nodes per pass to sweep for the full exact pass "
        "(default 256 512 1024; quick 512)",
    )
    parser.add_argument(
        "--adapter", type=Path, help="LoRA adapter to merge into the model (e.g. a quick run's)"
    )
    parser.add_argument(
        "--tolerances",
        nargs="*",
        type=float,
        help="pruned exact pass: tolerances to time "
        "(default 1e-2 1e-3 1e-4; quick: the default 1e-3)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.max_bins = args.max_bins or (1001 if args.quick else 16384)
    args.samples = args.samples or (100 if args.quick else 1000)
    args.sample_batch_size = 250
    args.chunk_sizes = args.chunk_sizes or ([512] if args.quick else [256, 512, 1024])
    args.leaf_values = 0 if args.quick else 256
    if args.tolerances is None:
        args.tolerances = [DEFAULT_TOLERANCE] if args.quick else [1e-2, DEFAULT_TOLERANCE, 1e-4]
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.adapter:
        from peft import PeftModel

        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(args.adapter))
        model = model.merge_and_unload().eval()
    chat = ChatFormat.from_tokenizer(tokenizer)
    trie_tokenizer = TrieTokenizer.from_hf(tokenizer, chat)
    ood = splits("paper_selected")["test_ood_family"]
    # A continuous prompt (16384 bins: the expensive case) and, in full mode, an integer one.
    picks = [s for s in ood if s.family == "truncnorm"][:1]
    if not args.quick:
        picks += [s for s in ood if s.family == "poisson"][1:2]
    rows = [bench_prompt(model, tokenizer, chat, trie_tokenizer, spec, args) for spec in picks]
    out = {
        "bench": "eval",
        "mode": "quick" if args.quick else "full",
        "model": args.model,
        "adapter": str(args.adapter) if args.adapter else None,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine_info(),
        "prompts": rows,
    }
    write_json(args.output or default_output("bench_eval", args.quick), out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
