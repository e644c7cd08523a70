"""Model families: one FamilySpec per supported family, and what the `lora.target_modules` presets "attention" and
"all-linear" name in each.

A preset is only a spelling: training resolves it to the sorted module names below, and those names are what
LoRA adapts and what adapter_config.json and the manifest record. So a preset and its expansion written out as a
list give the same bytes. Names match as PEFT matches them: a module whose dotted name is the entry or ends with
"." + the entry. No preset names the output head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reprolora.core.errors import ReproloraError

if TYPE_CHECKING:
    from reprolora.core.config import Config

PRESETS = ("attention", "all-linear")


@dataclass(frozen=True)
class FamilySpec:
    """What reprolora knows of one model family, by the model type of its config.json."""

    model_type: str
    presets: dict[str, list[str]]  # LoRA's module names for each of PRESETS
    # llama.cpp's tensor names (gguf-py's tensor_mapping), the one table both GGUF directions read
    # (reprolora.models.gguf_layout): whole-model tensors by module name, and a layer's by its name inside the
    # layer. None: the family is not read from or written to GGUF.
    gguf_names: dict[str, str] | None = None
    gguf_layer_names: dict[str, str] | None = None


_LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LLAMA_STYLE = {"attention": _LLAMA_ATTENTION, "all-linear": _LLAMA_ATTENTION + ["gate_proj", "up_proj", "down_proj"]}

# GPT-2's layers are transformers' Conv1D (a linear layer with its weight transposed), and its `c_proj` is both
# the attention output and the MLP's second layer: "attn.c_proj" is the attention's only.
FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec(
            "llama",
            _LLAMA_STYLE,
            gguf_names={"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"},
            gguf_layer_names={
                "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down",
                "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm",
            },
        ),
        FamilySpec("mistral", _LLAMA_STYLE),
        FamilySpec("qwen2", _LLAMA_STYLE),
        FamilySpec("gpt2", {"attention": ["attn.c_attn", "attn.c_proj"], "all-linear": ["c_attn", "c_proj", "c_fc"]}),
        FamilySpec(
            "gpt_neox",
            {
                "attention": ["query_key_value", "dense"],
                "all-linear": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            },
        ),
    )
}


def preset_modules(model_type: str, preset: str) -> list[str]:
    """The sorted module names `preset` stands for in models of `model_type`."""
    if preset not in PRESETS:
        raise ReproloraError(f"lora.target_modules: unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    if model_type not in FAMILIES:
        raise ReproloraError(
            f"lora.target_modules: preset {preset!r} is defined for model types {', '.join(sorted(FAMILIES))}, "
            f"not {model_type!r}; name the modules as a list"
        )
    return sorted(FAMILIES[model_type].presets[preset])


def target_modules(model: Any, spec: str | list[str]) -> list[str]:
    """The sorted, distinct module names LoRA adapts in `model` for `lora.target_modules = spec`, each checked:
    present in the model and a layer LoRA can adapt (linear, GPT-2's Conv1D, embedding)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = preset_modules(model.config.model_type, spec) if isinstance(spec, str) else sorted(set(spec))
    modules = list(model.named_modules())
    for name in names:
        found = [module for key, module in modules if key == name or key.endswith("." + name)]
        if not found:
            raise ReproloraError(f"lora.target_modules: the base model has no module named {name!r}")
        other = next((m for m in found if not isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding))), None)
        if other is not None:
            raise ReproloraError(
                f"lora.target_modules: {name!r} names a {type(other).__name__}, not a linear layer LoRA can adapt"
            )
    return names


def resolve(config: Config, model: Any) -> Config:
    """`config` with `lora.target_modules` resolved for `model` (see target_modules)."""
    import dataclasses

    lora = dataclasses.replace(config.lora, target_modules=target_modules(model, config.lora.target_modules))
    return dataclasses.replace(config, lora=lora)
