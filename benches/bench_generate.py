"""Generation throughput of calibft's shared-prefill sampler against transformers' own `generate`,
and the wall time of the open_random and mcq benchmarks (SmolLM2-135M, CPU by default).

    python benches/bench_generate.py            # 8 open-ended prompts x 100 samples x 16 tokens,
                                                # both samplers side by side; then open_random on
                                                # all 102 prompts and mcq on 100 generations
    python benches/bench_generate.py --quick    # 2 prompts x 20 samples, tiny benchmark runs
    python benches/bench_generate.py --device cuda --random-weights --open-random-prompts 0 \
        --mcq-samples 0                         # on a GPU, nothing to download: SmolLM2-135M's
                                                # shape with random weights, random prompt ids

Both samplers draw pure ancestral samples (temperature 1, top-p 1, no top-k) from the same
chat-templated prompts and stop at the same end tokens. calibft prefills each prompt once and
shares its KV cache across the batch, dropping finished rows; `generate(num_return_sequences=N)`
prefills N copies and keeps finished rows until the longest ends. The benchmark runs go through
`calibft.eval.runner.evaluate` (model load included); figures for the full sizes are extrapolated
from the measured per-generation time and marked as such.

--random-weights builds the model from SmolLM2-135M's configuration (below) with random weights and
draws each prompt as 40 random token ids: no file is read, so it runs on a machine without the
model package. Its near-uniform next-token laws almost never end a row, so every generation runs
to --max-new-tokens and the comparison is of the per-step cost (and host synchronization) alone.

On a CPU shared with other jobs, pass --threads 1: with more compute threads than free cores,
torch's OpenMP workers spin against each other (measured here at load ~10 on 2 cores: 100
samples x 16 tokens took 16 s on one thread, 115 s on two).

Writes benches/results/bench_generate[-quick].json (or --output) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from calibft.chat import ChatFormat
from calibft.eval.benchmarks import mcq, open_random
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate
from calibft.lm.decode import prefill
from calibft.lm.load import load_model_and_tokenizer
from calibft.lm.sample import sample_completions
from calibft.lm.session import end_token_ids
from calibft.splits import evenly_spaced

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, machine_info, write_json  # noqa: E402

FULL_OPEN_RANDOM = 102 * 100  # generations per checkpoint at the paper's sizes
FULL_MCQ = 1000
RANDOM_PROMPT_TOKENS = 40  # about the length of open_random's chat-templated prompts
# SmolLM2-135M-Instruct's shape (its config.json), for --random-weights.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def calibft_sample(model, ids, args, end_ids, seed) -> list[int]:
    state = prefill(model, ids)
    out = sample_completions(
        model,
        state,
        args.samples,
        seed=seed,
        end_ids=end_ids,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.samples,
    )
    return [len(c) for c in out]


@torch.inference_mode()
def hf_generate(model, ids, args, end_ids, pad_id, seed) -> list[int]:
    torch.manual_seed(seed)
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        num_return_sequences=args.samples,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
    )
    new = out[:, len(ids) :]
    # Generated length of each row: up to (not including) its first end token.
    ended = torch.isin(new, torch.tensor(end_ids, device=new.device))
    lengths = torch.where(
        ended.any(1), ended.int().argmax(1), torch.full((len(new),), new.shape[1])
    )
    return lengths.tolist()


def model_and_prompts(args) -> tuple:
    """The model, its end ids, its pad id and the prompts' token ids."""
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=dtype)
        model = model.to(args.device).eval()
        generator = torch.Generator().manual_seed(0)
        vocab = SMOLLM2_135M["vocab_size"]
        shape = (RANDOM_PROMPT_TOKENS,)
        prompts = [
            torch.randint(3, vocab, shape, generator=generator).tolist()
            for _ in range(args.prompts)
        ]
        eos = SMOLLM2_135M["eos_token_id"]
        return model, [eos], eos, prompts
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=args.device)
    model.eval()
    chat = ChatFormat.from_tokenizer(tokenizer)
    end_ids = end_token_ids(tokenizer, chat)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    texts = evenly_spaced(open_random.load_prompts(), args.prompts)
    return model, end_ids, pad_id, [chat.prompt_ids(text) for text in texts]


def sampler_comparison(args) -> dict:
    model, end_ids, pad_id, prompts = model_and_prompts(args)
    # Warm-up: one short draw each, so neither pays first-call costs inside the timing.
    warm = prompts[0]
    small = argparse.Namespace(samples=4, max_new_tokens=2)
    calibft_sample(model, warm, small, end_ids, 0)
    hf_generate(model, warm, small, end_ids, pad_id, 0)
    times = {"calibft": 0.0, "transformers": 0.0}
    tokens = {"calibft": 0, "transformers": 0}
    for i, ids in enumerate(prompts):
        runs = [
            ("calibft", partial(calibft_sample, model, ids, args, end_ids, i)),
            ("transformers", partial(hf_generate, model, ids, args, end_ids, pad_id, i)),
        ]
        for name, fn in runs if i % 2 == 0 else runs[::-1]:  # alternate the order against drift
            start = time.perf_counter()
            lengths = fn()
            times[name] += time.perf_counter() - start
            tokens[name] += sum(lengths)
    n = len(prompts) * args.samples
    result = {
        name: {
            "seconds": times[name],
            "generations_per_s": n / times[name],
            "new_tokens": tokens[name],
            "tokens_per_s": tokens[name] / times[name],
            "mean_tokens_per_generation": tokens[name] / n,
        }
        for name in times
    }
    result["speedup"] = (
        result["calibft"]["generations_per_s"] / result["transformers"]["generations_per_s"]
    )
    result["speedup_tokens_per_s"] = (
        result["calibft"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    )
    result["prompts"] = len(prompts)
    return result


def benchmark_run(args, name: str, config) -> dict:
    with tempfile.TemporaryDirectory() as out:
        shared = EvalConfig(
            model=args.model, output=out, progress=False, plots=False, device=args.device
        )
        start = time.perf_counter()
        report = evaluate(shared, {name: config})
        seconds = time.perf_counter() - start
    summary = report["benchmarks"][name]["checkpoints"]["base"]
    return {
        "seconds": seconds,
        "summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 2 prompts x 20 samples, tiny runs"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default benches/results/bench_generate[-quick].json)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default float32 on CPU, bfloat16 otherwise)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2-135M's shape with random weights and random prompt ids (reads no file); "
        "skips the benchmark runs",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--prompts", type=int, help="open-ended prompts for the sampler comparison (default 8)"
    )
    parser.add_argument(
        "--samples", type=int, help="samples per prompt (default 100, as open_random)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="as open_random")
    parser.add_argument(
        "--open-random-prompts",
        type=int,
        help="prompts of the timed open_random run (default all 102; 0 skips it)",
    )
    parser.add_argument(
        "--mcq-samples", type=int, help="generations of the timed mcq run (default 100; 0 skips it)"
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.random_weights:
        args.open_random_prompts = args.mcq_samples = 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.prompts = args.prompts or (2 if args.quick else 8)
    args.samples = args.samples or (20 if args.quick else 100)
    if args.open_random_prompts is None:
        args.open_random_prompts = 2 if args.quick else 102
    if args.mcq_samples is None:
        args.mcq_samples = 4 if args.quick else 100

    out: dict = {
        "mode": "quick" if args.quick else "full",
        "model": "random weights, SmolLM2-135M shape" if args.random_weights else args.model,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "prompts": args.prompts,
            "samples": args.samples,
            "max_new_tokens": args.max_new_tokens,
        },
        "sampler_comparison": sampler_comparison(args),
    }
    if args.open_random_prompts:
        config = open_random.Config(prompts=args.open_random_prompts)
        run = benchmark_run(args, "open_random", config)
        generations = len(open_random.items(config)) * config.samples
        run |= {
            "generations": generations,
            "extrapolated_full_seconds": run["seconds"] * FULL_OPEN_RANDOM / generations,
        }
        out["open_random_run"] = run
    if args.mcq_samples:
        run = benchmark_run(args, "mcq", mcq.Config(samples=args.mcq_samples))
        run |= {
            "generations": args.mcq_samples,
            "extrapolated_full_seconds": run["seconds"] * FULL_MCQ / args.mcq_samples,
        }
        out["mcq_run"] = run
    out["machine"] = machine_info()
    write_json(args.output or default_output("bench_generate", args.quick), out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
