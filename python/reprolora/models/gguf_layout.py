"""llama.cpp's tensor layout for a Llama model, both ways: the names (the Llama FamilySpec's one table) and the
rotary order of q and k. Reading the default model's GGUF (reprolora.models.base_model) and writing one
(reprolora.export.export_gguf) both go through here, so each direction is the other's inverse by construction.

Hugging Face `model.layers.N.self_attn.q_proj.weight` is llama.cpp's `blk.N.attn_q.weight`; whole-model tensors
map by module name (`model.embed_tokens.weight` is `token_embd.weight`). Standard library only; the arrays are
numpy's, passed in.
"""

from __future__ import annotations

import re
from typing import Any

from reprolora.core.errors import ReproloraError
from reprolora.models.families import FAMILIES

LLAMA = FAMILIES["llama"]
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
ROTARY = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}  # permuted, by their head count


def to_gguf(name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name (weights only: a Llama has no biases)."""
    module, _, suffix = name.rpartition(".")
    if module in LLAMA.gguf_names and suffix == "weight":
        return f"{LLAMA.gguf_names[module]}.weight"
    match = _HF_LAYER.match(name)
    if not match or match.group(2) not in LLAMA.gguf_layer_names:
        raise ReproloraError(f"tensor {name!r} has no place in llama.cpp's Llama layout")
    return f"blk.{match.group(1)}.{LLAMA.gguf_layer_names[match.group(2)]}.weight"


def from_gguf(name: str) -> str:
    """The Hugging Face Llama tensor name for a llama.cpp tensor name."""
    match = _GGUF_LAYER.match(name)
    if match:
        kind = match.group(2)
        layer_names = {gguf: hf for hf, gguf in LLAMA.gguf_layer_names.items()}
        if kind in layer_names:
            return f"model.layers.{match.group(1)}.{layer_names[kind]}.{match.group(3)}"
    else:
        module, _, suffix = name.rpartition(".")
        global_names = {gguf: hf for hf, gguf in LLAMA.gguf_names.items()}
        if module in global_names:
            return f"{global_names[module]}.{suffix}"
    raise ReproloraError(f"GGUF tensor {name!r} has no place in the Hugging Face Llama layout")


def rotary_heads(gguf_name: str, config: dict[str, Any]) -> int | None:
    """The head count whose rotary halves the tensor's rows are permuted by, or None: only q and k are."""
    match = _GGUF_LAYER.match(gguf_name)
    return int(config[ROTARY[match.group(2)]]) if match and match.group(2) in ROTARY else None


def permute(weights: Any, heads: int) -> Any:
    """q/k rows from Hugging Face's rotary order (halves) into llama.cpp's (interleaved pairs), per head
    (convert_hf_to_gguf.py's permute)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute(weights: Any, heads: int) -> Any:
    """The inverse of `permute`: llama.cpp's interleaved rotary pairs back into Hugging Face's halves."""
    return (
        weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
