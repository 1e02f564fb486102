"""Training as it runs on several GPUs, proven on CPU: FSDP2 on a gloo mesh, LoRA targets of a
multimodal model, targets in float32 under mixed precision, the resume plan check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from tiny_models import tiny_tokenizer, torchrun
from transformers import (
    get_constant_schedule,
)

import calibft.train.loop as tr
from calibft.config import build
from calibft.doctor.tiny import family_model
from calibft.lm.adapters import add_lora
from calibft.train.checkpoints import adapter_state, peft_name
from calibft.train.config import TrainConfig
from calibft.train.data import DataPlan
from calibft.train.loop import check_gradients, check_model, train_step

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- FSDP2


@pytest.mark.slow
def test_fsdp_step_equals_single_process(model_dir, tmp_path):
    """2 ranks x batch 2 under FSDP2 (per-layer units), FSDP1 (per-layer units, LoRA leaves
    apart) and DDP, gloo == 1 process x batch 4: the step's loss and gradient norm to 1e-5, and
    the clipped update (a rank clipping by its own shard's norm would move the adapter
    differently); each one's checkpoint loads back on 2 ranks (from rank 0's files)."""
    result = tmp_path / "fsdp.json"
    cmd = torchrun(
        str(WORKER),
        str(model_dir),
        str(result),
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(result.read_text())

    worker = _worker_module()
    config = build(TrainConfig, {**worker.CONFIG, "model": str(model_dir), "output": "unused"})
    config = build(TrainConfig, {**config.to_dict(), "batch_size": 4})
    module, batches = worker.step_inputs(config, 0, 1)
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    loss, _, grad_norm = train_step(
        accelerator, module, optimizer, get_constant_schedule(optimizer), batches, 1e-3
    )
    assert float(grad_norm) > 1e-3  # so clipping applied, with the global norm on every rank
    # The gathered adapter holds the LoRA tensors only, equal to the single-process update.
    expected = adapter_state(module)
    assert expected and all("lora_" in k for k in expected)
    for version in ("fsdp2", "fsdp1", "ddp"):
        step = got[version]
        assert step["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-5), version
        assert step["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5), version
        assert set(step["adapter"]) == set(expected), version
        for key, tensor in expected.items():
            torch.testing.assert_close(
                torch.tensor(step["adapter"][key]), tensor, atol=1e-6, rtol=1e-5
            )
        # Its checkpoint, loaded into a fresh sharded module, gives back the same tensors.
        assert step["resumed_step"] == 1 and step["resumed_adapter"] == step["adapter"], version

    # One FSDP2 unit per decoder layer plus the root, which keeps the tied embeddings and head.
    layers = [f"lm.base_model.model.model.layers.{i}" for i in range(2)]
    assert sorted(got["units"]) == ["", *layers] and got["tied"]
    # bf16 FSDP mixed precision: hidden states in bf16, targets and weights still float32, exact.
    assert got["mixed_dtypes"] == ["torch.float32", "torch.float32", "torch.bfloat16"]
    assert got["mixed_targets_exact"]


def test_fsdp_without_layer_wrapping_is_refused(model_dir):
    """No-wrap and size-based FSDP are refused with the flag to set; transformer-based wrapping
    gets the decoder layer class (and, for FSDP1, peft's policy with the LoRA leaves)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    worker = _worker_module()
    config = build(TrainConfig, {**worker.CONFIG, "model": str(model_dir), "output": "unused"})
    module, _ = worker.step_inputs(config, 0, 1)
    for policy in ("no_wrap", "size_based_wrap"):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=policy)
        with pytest.raises(ValueError, match="launch with --fsdp_auto_wrap_policy TRANSFORMER"):
            tr.configure_fsdp(plugin, module)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    plugin.set_mixed_precision("bf16")  # as accelerate does for mixed_precision=bf16
    tr.configure_fsdp(plugin, module)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    policy = plugin.mixed_precision_policy  # LoRA gradients averaged in float32
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1, auto_wrap_policy="transformer_based_wrap", use_orig_params=True
    )
    tr.configure_fsdp(plugin, module)
    # peft's policy: a LoRA leaf is a unit of its own, a frozen leaf is not.
    lora_leaf = module.lm.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    frozen = module.lm.get_base_model().model.layers[0].mlp.up_proj
    assert plugin.auto_wrap_policy(lora_leaf, recurse=False, nonwrapped_numel=0)
    assert not plugin.auto_wrap_policy(frozen, recurse=False, nonwrapped_numel=0)


# ----------------------------------------------------------------------------- LoRA targets


def test_gemma3_it_targets_stay_in_the_language_model():
    model = family_model(tiny_tokenizer(), "gemma3_it")  # 4 text layers, a SigLIP vision tower
    assert any("vision" in n and n.endswith("q_proj") for n, _ in model.named_modules())
    config = TrainConfig(lora_dropout=0.0)
    check_model(model, config)
    lm = add_lora(model, r=2, alpha=4, dropout=0.0, targets=config.lora_targets, base_name="g")
    adapted = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert len(adapted) == 2 * 4 * 4  # A and B of q, k, v, o in 4 layers
    assert all(".language_model.layers." in n for n in adapted)
    assert lm.peft_config["default"].target_modules == {
        f"model.language_model.layers.{i}.self_attn.{proj}"
        for i in range(4)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    }

    # One text step gives every adapter a gradient; a trainable vision weight gets none and is
    # named before the optimizer steps.
    module = tr.CompletionLoss(lm, 1.0, 0).train()
    ids = torch.tensor([[5, 17, 42, 99]])
    hidden = module.lm.get_base_model().get_decoder()(input_ids=ids).last_hidden_state
    hidden.sum().backward()
    check_gradients(module)
    tower = module.lm.get_base_model().model.vision_tower
    next(tower.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 trainable parameters get no gradient .*vision_tower"):
        check_gradients(module)


def test_target_only_in_the_vision_tower_is_refused():
    """SigLIP's attention output is `out_proj` (Gemma's is `o_proj`): refused before training."""
    model = family_model(tiny_tokenizer(), "gemma3_it")
    with pytest.raises(
        ValueError,
        match=r"lora_targets: out_proj only outside the language model, where text gives no "
        r"gradient \(model.vision_tower.*; its linear modules are",
    ):
        check_model(model, TrainConfig(lora_targets=["q_proj", "out_proj"]))


def test_peft_names_drop_the_module_prefix_and_adapter_name():
    name = "lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert peft_name(name) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    emb = "lm.base_model.model.model.embed_tokens.lora_embedding_A.default"
    assert peft_name(emb) == "base_model.model.model.embed_tokens.lora_embedding_A"


# ----------------------------------------------------------------------------- precision


def test_targets_reach_the_loss_in_float32_under_bf16_autocast(model_dir, monkeypatch):
    worker = _worker_module()
    config = build(TrainConfig, {**worker.CONFIG, "model": str(model_dir), "output": "unused"})
    module, batches = worker.step_inputs(config, 0, 1)
    seen = []
    real = tr.fused_sparse_kl

    def spy(hidden, weight, targets, position_weights, **kwargs):
        seen.append((targets, position_weights))
        return real(hidden, weight, targets, position_weights, **kwargs)

    monkeypatch.setattr(tr, "fused_sparse_kl", spy)
    batch = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(*batch.inputs(torch.device("cpu")))
    targets, weights = seen[0]
    assert loss.dtype == torch.float32
    assert targets.probs.dtype == weights.dtype == torch.float32
    assert torch.equal(targets.probs, batch.targets.probs.float())
    assert torch.equal(weights, batch.weights)


# ----------------------------------------------------------------------------- resume plan


@pytest.mark.parametrize("token_mean", [False, True])
def test_plan_signature_is_the_steps_not_the_world_size(token_mean):
    """Equal signatures exactly when every optimizer step trains on the same examples with the
    same weights: 2 ranks x batch 1 == 1 rank x batch 1 x 2 accumulation == 1 rank x batch 2
    (per-sequence mean; 12 examples); 1 rank x batch 1 takes twice as many steps; with 7
    examples the last step of 2 ranks (padded by wrap-around) differs from 1 rank's."""
    families = ["a", "b", "c"] * 4

    def signature(world, batch, accum, fams=families):
        plan = DataPlan(fams, 1, 0, batch, accum, 0, world)
        return plan.signature(2, token_mean)

    reference = signature(2, 1, 1)
    # A token mean runs over each micro-batch's tokens: one batch of 2 is not two batches of 1.
    assert (signature(1, 2, 1) == reference) is not token_mean
    assert signature(1, 1, 2) == reference
    assert signature(1, 1, 1) != reference
    assert signature(2, 1, 1, families[:7]) != signature(1, 2, 1, families[:7])


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    worker = _worker_module()
    results = []
    for checkpointing in (False, True):
        values = {**worker.CONFIG, "model": str(model_dir), "output": "unused"}
        config = build(TrainConfig, {**values, "gradient_checkpointing": checkpointing})
        module, batches = worker.step_inputs(config, 0, 1)
        decoder = module.lm.get_base_model().get_decoder()
        assert decoder.gradient_checkpointing is checkpointing
        loss = tr._forward(module, batches[0], torch.device("cpu"))
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_gc, grads_gc) = results
    torch.testing.assert_close(loss_gc, loss)
    assert grads_gc.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], atol=1e-7, rtol=1e-5)
