"""LoRA adapters: naming and fingerprinting them, checking one fits a base model, adding a fresh
one for training and attaching saved ones for evaluation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from calibft.files import atomic_write_bytes

BASE = "base"
"""Name of the checkpoint without an adapter."""
CONFIG_FILE = "train_config.json"
"""The resolved training config that `calibft train` writes next to the adapter."""
LORA_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
"""Module types that peft's LoRA can adapt by name. Not among them: GPT-OSS's experts and router,
which hold bare parameters (docs/architectures.md)."""


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's model wrapping: peft (0.21) reads transformers' `is_gradient_checkpointing`,
    which transformers 5.2x deprecated with a FutureWarning that is about peft's code, not the
    user's, so it is kept off their screen."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


@dataclass(frozen=True)
class Checkpoint:
    """The base model (adapter None) or one LoRA adapter on it, its update B·A·(alpha/r) scaled
    by `scale` (1: as trained; 0: the base model; see `scaled_name`)."""

    name: str
    adapter: Path | None = None
    scale: float = 1.0

    @cached_property
    def fingerprint(self) -> str:
        """Changes when the adapter's weights or its scale change, so stale cached results are
        not reused; at scale 1 the same as before scales existed (their caches stay valid)."""
        if self.adapter is None:
            return BASE
        digest = hashlib.sha256()
        for path in sorted(self.adapter.glob("adapter_model.*")):
            digest.update(path.read_bytes())
        digest.update((self.adapter / "adapter_config.json").read_bytes())
        if self.scale != 1:
            digest.update(f"scale={self.scale!r}".encode())
        return digest.hexdigest()

    def train_config(self) -> dict[str, Any]:
        """The training config `calibft train` saved with the adapter ({} when there is none)."""
        path = self.adapter / CONFIG_FILE if self.adapter is not None else None
        return json.loads(path.read_text("utf-8")) if path is not None and path.is_file() else {}


def scaled_name(name: str, scale: float) -> str:
    """`<adapter>@<scale>`, the scale written as the shortest float that reads back as it."""
    return f"{name}@{int(scale) if float(scale).is_integer() else repr(float(scale))}"


def resolve_checkpoints(
    adapters: Sequence[str], scales: Sequence[float] = (1.0,)
) -> list[Checkpoint]:
    """`base`, then per adapter directory one checkpoint per LoRA scale: named by the
    directory's name when `scales` is just (1,), else `<name>@<scale>` (`scaled_name`)."""
    if not scales:
        raise ValueError("adapter_scale: give at least one scale (1 evaluates adapters as trained)")
    if len(set(scales)) != len(scales):
        raise ValueError(f"adapter_scale: {list(scales)} lists a scale twice")
    sweep = list(scales) != [1]
    if sweep and not adapters:
        raise ValueError("adapter_scale scales adapters: give them with --adapter DIR")
    checkpoints = [Checkpoint(BASE)]
    names = {BASE}
    for raw in adapters:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ValueError(f"adapter: {raw!r} is not a directory")
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"adapter: {raw!r} has no adapter_config.json (is it a PEFT adapter?)")
        if not any(path.glob("adapter_model.*")):
            raise ValueError(f"adapter: {raw!r} has no adapter_model weights file")
        name = path.resolve().name
        if name in names:
            raise ValueError(
                f"adapter: two checkpoints would be named {name!r} ({raw!r}); "
                f"adapter directory names must be unique and not {BASE!r}"
            )
        names.add(name)
        if sweep:
            _refuse_unscalable(raw, path)
        checkpoints += [
            Checkpoint(scaled_name(name, s) if sweep else name, path.resolve(), float(s))
            for s in scales
        ]
    return checkpoints


def _refuse_unscalable(raw: str, path: Path) -> None:
    """Adapters whose effect is not B·A·(alpha/r) alone cannot be scaled: DoRA normalizes the
    scaled weight (scale 0 would not be the base model) and modules_to_save are whole copies."""
    config = json.loads((path / "adapter_config.json").read_text("utf-8"))
    for key in ("use_dora", "modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise ValueError(
                f"adapter_scale: adapter {raw!r} sets {key}, which a LoRA scale does not scale; "
                "evaluate it without --adapter-scale"
            )


def check_adapter_matches(model: Any, checkpoint: Checkpoint, model_names: set[str]) -> None:
    """Refuse an adapter that was trained on another base model.

    The adapter's recorded base model must be one of `model_names` (the name the user gave and the
    path the model was loaded from) and every LoRA matrix must fit the module it adapts.
    """
    assert checkpoint.adapter is not None
    config = json.loads((checkpoint.adapter / "adapter_config.json").read_text("utf-8"))
    recorded = config.get("base_model_name_or_path")
    if recorded and not _same_model(recorded, model_names):
        raise ValueError(
            f"adapter {checkpoint.name!r} was trained on base model {recorded!r}, "
            f"not on {sorted(model_names)[0]!r}; pass --model {recorded!r}"
        )
    weights = checkpoint.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(module_name)
            shape = tuple(f.get_slice(key).get_shape())
            fits = module is not None and (
                shape[1] == getattr(module, "in_features", None)
                if ".lora_A." in key
                else shape[0] == getattr(module, "out_features", None)
            )
            if not fits:
                raise ValueError(
                    f"adapter {checkpoint.name!r} does not fit this base model: {key} has shape "
                    f"{shape}, module {module_name!r} is {_describe(module)}; it was trained on "
                    f"another base model ({recorded or 'unknown'})"
                )


def _same_model(recorded: str, names: set[str]) -> bool:
    if recorded in names:
        return True
    path = Path(recorded).expanduser()
    return path.exists() and any(
        Path(n).expanduser().exists() and Path(n).expanduser().resolve() == path.resolve()
        for n in names
    )


def _describe(module: Any) -> str:
    if module is None:
        return "missing"
    shape = (getattr(module, "in_features", "?"), getattr(module, "out_features", "?"))
    return f"{type(module).__name__}(in={shape[0]}, out={shape[1]})"


def attach_adapter(model: Any, peft_model: Any, checkpoint: Checkpoint) -> Any:
    """Load the adapter onto the same base weights (into `peft_model` when there is one already;
    once per directory, whatever its scales), make it the active one at the checkpoint's scale;
    returns the PEFT model in eval mode."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    # PEFT keeps adapters in module dicts: a directory named e.g. "train" or "run.v2" is not a
    # valid key there, so the adapter gets a name derived from the directory's path.
    name = "calibft_" + hashlib.sha256(str(checkpoint.adapter).encode()).hexdigest()[:12]
    if peft_model is None:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(
                model, str(checkpoint.adapter), adapter_name=name
            )
    elif name not in peft_model.peft_config:
        with peft_wrapping():
            peft_model.load_adapter(str(checkpoint.adapter), adapter_name=name)
    peft_model.set_adapter(name)
    peft_model.base_model.enable_adapter_layers()  # off while a base-model session ran
    # set_scale sets scaling = scale * alpha / r (alpha / sqrt(r) under rsLoRA) from the layer's
    # own alpha and r, not relative to the last scale, so scale 1 is exactly the trained adapter.
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(name, checkpoint.scale)
    return peft_model.eval()


def write_scaled_adapter(checkpoint: Checkpoint, directory: Path) -> Path:
    """A copy of the checkpoint's adapter in `directory` whose lora_B weights (and biases) are
    multiplied by its scale: the same update B·A·(alpha/r)·scale, for backends (vLLM) that load
    adapters from disk and take no scale."""
    from safetensors.torch import load_file, save

    assert checkpoint.adapter is not None
    weights = checkpoint.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(
            f"adapter_scale: adapter {checkpoint.name!r} has no adapter_model.safetensors to "
            "scale (re-save it with safetensors, or evaluate it without --adapter-scale)"
        )
    tensors = load_file(str(weights))
    scaled = {
        key: value * checkpoint.scale if ".lora_B." in key else value
        for key, value in tensors.items()
    }
    atomic_write_bytes(
        directory / "adapter_model.safetensors", save(scaled, metadata={"format": "pt"})
    )
    config = (checkpoint.adapter / "adapter_config.json").read_bytes()
    atomic_write_bytes(directory / "adapter_config.json", config)
    return directory


def language_model_name(model: Any) -> str:
    """The name of `model`'s text decoder among its modules ('' when it is the model itself):
    the part a text-only forward runs, where a LoRA adapter gets a gradient."""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def lora_target_names(model: Any, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """The adaptable modules whose last name is one of `targets`: the full names of those in the
    language model, and of those outside it (e.g. Gemma-3-it's vision tower)."""
    prefix = language_model_name(model)
    wanted = set(targets)
    inside: list[str] = []
    outside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LORA_MODULES) and name.rsplit(".", 1)[-1] in wanted:
            within = not prefix or name.startswith(prefix + ".")
            (inside if within else outside).append(name)
    return inside, outside


def add_lora(
    model: nn.Module, *, r: int, alpha: int, dropout: float, targets: Sequence[str], base_name: str
) -> nn.Module:
    """Wrap `model` with a fresh LoRA adapter on the `targets` of its language model only;
    `base_name` (the name the user gave, e.g. an alias, which `calibft.lm.load` resolves again) is
    recorded as the adapter's base model. The adapter's weights are float32 whatever the base
    model's dtype (peft's ``autocast_adapter_dtype``)."""
    from peft import LoraConfig, get_peft_model

    inside, outside = lora_target_names(model, targets)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # peft matches names by suffix, which would also adapt a vision tower's q_proj: modules
        # outside the language model get no gradient from text (and DDP's reducer would stall on
        # them), so then the exact names are given.
        target_modules=inside if outside else list(targets),
        task_type="CAUSAL_LM",
    )
    with peft_wrapping():
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model
