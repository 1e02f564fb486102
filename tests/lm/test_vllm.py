"""The vLLM backend against a stand-in `vllm` module that records what the engine receives: the
engine's arguments (rank slot, dtype, memory, context, tensor parallelism), the sampling
parameters (the transformers sampler's law and stop rule), adapters per request, and batching."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import save_random_adapter
from transformers import AutoModelForCausalLM

import calibft.lm.vllm as backend_module
from calibft.config import build
from calibft.lm.adapters import resolve_checkpoints
from calibft.lm.vllm import (
    LORA_RANKS,
    GenerationRequest,
    VLLMBackend,
    VLLMOptions,
    lora_rank_slot,
)

OUTPUT = [15, 16]  # what the stand-in engine generates before the stop token


class Recorder:
    """The stand-in `vllm` module's classes, recording every call."""

    def __init__(self, end_id: int) -> None:
        self.engines: list[dict] = []
        self.generate_calls: list[dict] = []
        recorder = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LoRARequest:
            def __init__(self, name, int_id, path):
                self.name, self.int_id, self.path = name, int_id, path

        class LLM:
            def __init__(self, **kwargs):
                recorder.engines.append(kwargs)

            def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
                recorder.generate_calls.append(
                    dict(prompts=prompts, params=sampling_params, lora=lora_request)
                )
                # vLLM keeps a (non-special) stop token at the end of the output.
                return [
                    types.SimpleNamespace(
                        outputs=[
                            types.SimpleNamespace(token_ids=[*OUTPUT, end_id])
                            for _ in range(p.kwargs["n"])
                        ]
                    )
                    for p in sampling_params
                ]

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.request_module = types.ModuleType("vllm.lora.request")
        self.request_module.LoRARequest = LoRARequest


@pytest.fixture
def fake_vllm(monkeypatch, model_dir):
    from calibft.lm.load import load_tokenizer

    recorder = Recorder(end_id=load_tokenizer(str(model_dir)).convert_tokens_to_ids("<|im_end|>"))
    modules = {
        "vllm": recorder.module,
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.request": recorder.request_module,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return recorder


@pytest.fixture
def one_gpu(monkeypatch):
    """A CUDA device with 60 of 80 GiB free (the scoring model holds the rest)."""
    monkeypatch.setattr(backend_module, "_free_and_total", lambda index: (60 << 30, 80 << 30))


def test_rank_slots() -> None:
    assert [lora_rank_slot(r) for r in (1, 2, 4, 8, 9, 16, 24, 257, 320, 512)] == [
        1,
        8,
        8,
        8,
        16,
        16,
        32,
        320,
        320,
        512,
    ]
    assert all(lora_rank_slot(r) == r for r in LORA_RANKS)
    with pytest.raises(ValueError, match="above vLLM's largest"):
        lora_rank_slot(513)


def test_engine_arguments(fake_vllm, one_gpu, model_dir, adapter_dir, tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    wide = save_random_adapter(model, tmp_path / "wide")  # r=4 too; made r=12 below
    config = wide / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 12'))
    checkpoints = resolve_checkpoints([str(adapter_dir), str(wide)])
    VLLMBackend(
        str(model_dir), checkpoints, seed=3, max_model_len=600, dtype="float32", device="cpu"
    )
    (engine,) = fake_vllm.engines
    assert engine["enable_lora"] is True
    assert engine["max_lora_rank"] == 16  # ranks 4 and 12: the slot of the larger
    assert engine["max_loras"] == 2
    assert engine["dtype"] == "bfloat16"  # not the scoring model's float32
    assert engine["gpu_memory_utilization"] == pytest.approx(0.9 * 60 / 80, abs=1e-4)
    assert engine["max_model_len"] == 600
    assert engine["tensor_parallel_size"] == 1
    assert engine["seed"] == 3
    # Options win over the run's need; the base model alone needs no LoRA.
    options = build(
        VLLMOptions,
        {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.4, "max_model_len": 1024},
    )
    VLLMBackend(
        str(model_dir), resolve_checkpoints([]), vllm=options, max_model_len=600, device="cpu"
    )
    engine = fake_vllm.engines[1]
    assert engine["enable_lora"] is False and "max_lora_rank" not in engine
    assert engine["tensor_parallel_size"] == 2
    assert engine["gpu_memory_utilization"] == 0.4
    assert engine["max_model_len"] == 1024


def test_memory_is_sized_from_the_least_free_gpu(fake_vllm, monkeypatch, model_dir) -> None:
    free = {0: 70 << 30, 1: 40 << 30}
    monkeypatch.setattr(backend_module, "_free_and_total", lambda i: (free[i], 80 << 30))
    options = VLLMOptions(tensor_parallel_size=2)
    VLLMBackend(str(model_dir), resolve_checkpoints([]), vllm=options, device="cpu")
    assert fake_vllm.engines[0]["gpu_memory_utilization"] == pytest.approx(0.45, abs=1e-4)
    assert fake_vllm.engines[0]["max_model_len"] == backend_module.DEFAULT_MAX_MODEL_LEN
    monkeypatch.setattr(backend_module, "_free_and_total", lambda i: None)  # no CUDA
    VLLMBackend(str(model_dir), resolve_checkpoints([]), vllm=options, device="cpu")
    assert "gpu_memory_utilization" not in fake_vllm.engines[1]  # vLLM's CPU backend decides
    monkeypatch.setattr(backend_module, "_free_and_total", lambda i: (free[i], 80 << 30))
    free[1] = 1 << 30  # the scoring model fills GPU 1
    with pytest.raises(ValueError, match="put the scoring model on another GPU"):
        VLLMBackend(str(model_dir), resolve_checkpoints([]), vllm=options, device="cpu")


def test_float32_is_not_an_engine_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        build(VLLMOptions, {"dtype": "float32"})


def test_requests_are_batched_with_the_samplers_law_and_stop_rule(
    fake_vllm, one_gpu, model_dir, adapter_dir
) -> None:
    checkpoints = resolve_checkpoints([str(adapter_dir)])
    backend = VLLMBackend(str(model_dir), checkpoints, max_model_len=64, device="cpu")
    base, adapter = (backend.session(c) for c in checkpoints)
    requests = [
        GenerationRequest((5, 6, 7), n=4, max_new_tokens=8, seed=11),
        GenerationRequest((5, 9), n=2, max_new_tokens=3, seed=12),
        GenerationRequest((8,), n=1, max_new_tokens=5),  # greedy
    ]
    got = adapter.generate(requests)
    (call,) = fake_vllm.generate_calls  # one engine call for the three requests
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [[5, 6, 7], [5, 9], [8]]
    assert call["lora"].name == "soft-run" and call["lora"].path == str(adapter_dir.resolve())
    sampled, _, greedy = (p.kwargs for p in call["params"])
    assert sampled == dict(
        n=4,
        max_tokens=8,
        stop_token_ids=adapter.end_ids,
        ignore_eos=True,
        detokenize=False,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=11,
    )
    assert call["params"][1].kwargs["seed"] == 12 and call["params"][1].kwargs["n"] == 2
    assert greedy["temperature"] == 0.0 and greedy["n"] == 1 and "seed" not in greedy
    assert greedy["stop_token_ids"] == adapter.end_ids and greedy["ignore_eos"] is True
    # Completions stop before the end token, as the transformers sampler's do.
    assert got == [[OUTPUT] * 4, [OUTPUT] * 2, [OUTPUT]]
    # The single-request methods go through the same call; the base model sends no adapter.
    assert base.greedy([5, 6], 4) == OUTPUT
    assert base.sample(base.prefill([5, 6]), 3, seed=2, max_new_tokens=4) == [OUTPUT] * 3
    assert [c["lora"] for c in fake_vllm.generate_calls[1:]] == [None, None]
    with pytest.raises(ValueError, match="raise max_model_len"):
        base.greedy(list(range(60)), 8)


def test_missing_vllm_is_one_line(monkeypatch, model_dir) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'calibft\[vllm\]'"):
        VLLMBackend(str(model_dir), resolve_checkpoints([]))


def test_a_scaled_adapter_is_served_from_a_copy_with_lora_b_scaled(
    fake_vllm, one_gpu, model_dir, adapter_dir
) -> None:
    from safetensors.torch import load_file

    checkpoints = resolve_checkpoints([str(adapter_dir)], [0.25, 1])
    backend = VLLMBackend(str(model_dir), checkpoints, max_model_len=64, device="cpu")
    assert fake_vllm.engines[0]["max_loras"] == 2  # one slot per scale
    quarter, full = (backend.session(c).lora for c in checkpoints[1:])
    assert (quarter.name, full.name) == ("soft-run@0.25", "soft-run@1")
    assert full.path == str(adapter_dir.resolve())  # scale 1: the adapter itself
    assert quarter.int_id != full.int_id and quarter.path != full.path
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scaled = load_file(f"{quarter.path}/adapter_model.safetensors")
    assert scaled.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(scaled[key], value * 0.25 if ".lora_B." in key else value), key
    backend.session(checkpoints[1]).greedy([5, 6], 4)
    assert fake_vllm.generate_calls[-1]["lora"] is quarter


def test_a_benchmarks_batch_is_one_engine_call(fake_vllm, one_gpu, model_dir) -> None:
    """The runner's batch of items reaches vLLM as one `generate`: MCQ's shards (their own
    seeds and sizes), retention's greedy GSM8K rows, through the batched LM methods."""
    from calibft.eval.benchmarks import mcq

    backend = VLLMBackend(str(model_dir), resolve_checkpoints([]), max_model_len=2048, device="cpu")
    lm = backend.session(resolve_checkpoints([])[0])
    config = mcq.Config(samples=230, max_new_tokens=5)
    shards = [shard for item in mcq.items(config) for shard in item.shards()]
    records = mcq.run_batch(lm, shards, config, None, [7, 8, 9])
    (call,) = fake_vllm.generate_calls
    assert [p.kwargs["n"] for p in call["params"]] == [100, 100, 30]
    assert [p.kwargs["seed"] for p in call["params"]] == [7, 8, 9]
    assert len({tuple(p["prompt_token_ids"]) for p in call["prompts"]}) == 1
    assert [r["generations"] for r in records] == [100, 100, 30]
    got = lm.greedy_many([[5, 6], [7], [8, 9, 10]], 4)
    assert len(fake_vllm.generate_calls) == 2 and got == [OUTPUT] * 3
    greedy = fake_vllm.generate_calls[1]["params"]
    assert [p.kwargs["temperature"] for p in greedy] == [0.0] * 3
