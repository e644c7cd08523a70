"""Model families: one FamilySpec per supported family (its LoRA presets, where the decoder finds its modules and
how its layers compute, its GGUF names, its tiny test model), and what the `lora.target_modules` presets
"attention" and "all-linear" name in each.

A preset is only a spelling: training resolves it to the sorted module names below, and those names are what
LoRA adapts and what adapter_config.json and the manifest record. So a preset and its expansion written out as a
list give the same bytes. Names match as PEFT matches them: a module whose dotted name is the entry or ends with
"." + the entry. No preset names the output head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reprolora.core.errors import ReproloraError

if TYPE_CHECKING:
    from reprolora.core.config import Config

PRESETS = ("attention", "all-linear")


def _full_attention(config: Any, layers: int) -> list[int | None]:
    return [None] * layers


def _mistral_windows(config: Any, layers: int) -> list[int | None]:
    return [getattr(config, "sliding_window", None)] * layers


def _qwen2_windows(config: Any, layers: int) -> list[int | None]:
    """The sliding window on the layers config.layer_types says slide (none where it is not given)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    return [window if kind == "sliding_attention" else None for kind in types]


def _head_dim_scalings(config: Any, layers: int, head_dim: int) -> list[float]:
    return [head_dim**-0.5] * layers


def _gpt2_scalings(config: Any, layers: int, head_dim: int) -> list[float]:
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ReproloraError("gpt2 models with reorder_and_upcast_attn are not supported by the decoder")
    scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
    return [scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale for i in range(layers)]


@dataclass(frozen=True)
class DecoderLayout:
    """Where the decoder (reprolora.decoding.forward) finds a family's modules, and how its layers compute, as
    transformers writes them. Paths are dotted attribute names: the model's in the causal LM, a layer's in the
    layer."""

    embed: str
    layers: str
    final_norm: str  # the output head is the model's get_output_embeddings(): its name differs by version
    rotary: str | None  # the rotary embedding's module; None: no rotary embedding
    positions: str | None  # learned position embeddings added to the tokens' (GPT-2's); None: none
    norms: tuple[str, str]  # before the attention and before the MLP
    qkv: tuple[str, ...]  # the q, k and v projections, or the one projection that gives all three
    # How that one projection's outputs lie: "split" (GPT-2: every head's q, then k, then v) or "per-head"
    # (GPT-NeoX: each head's q, k and v together). "" for three projections.
    fused_qkv: str
    attention_out: str
    mlp: tuple[str, ...]  # (in, out): out(act(in x)); (gate, up, down): down(act(gate x) * up x)
    activation: str
    parallel_residual: str | None  # the layer's flag that attention and MLP both read its input (GPT-NeoX's)
    windows: Callable[[Any, int], list[int | None]]  # each layer's sliding window (None: all earlier positions)
    scalings: Callable[[Any, int, int], list[float]]  # each layer's attention scale, of (config, layers, head_dim)


@dataclass(frozen=True)
class TinyModel:
    """The family's tiny random model (reprolora.models.tiny), 2 layers of width 32, with a byte-level tokenizer set
    up as the family's real ones are."""

    config_class: str  # transformers' configuration class
    config: dict[str, Any]  # its arguments, but the vocabulary's size and the special tokens' ids
    chat_template: bool | str  # as tiny.write_tokenizer takes it: True for ChatML, False for none, or the template
    bos: str | None  # the special tokens (tiny.SPECIALS) that tokenizer and configuration name
    eos: str
    pad: str | None


@dataclass(frozen=True)
class FamilySpec:
    """What reprolora knows of one model family, by the model type of its config.json."""

    model_type: str
    presets: dict[str, list[str]]  # LoRA's module names for each of PRESETS
    decoder: DecoderLayout
    tiny: TinyModel
    # llama.cpp's tensor names (gguf-py's tensor_mapping), the one table both GGUF directions read
    # (reprolora.models.gguf_layout): whole-model tensors by module name, and a layer's by its name inside the
    # layer. None: the family is not read from or written to GGUF.
    gguf_names: dict[str, str] | None = None
    gguf_layer_names: dict[str, str] | None = None


_LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LLAMA_STYLE = {"attention": _LLAMA_ATTENTION, "all-linear": _LLAMA_ATTENTION + ["gate_proj", "up_proj", "down_proj"]}


def _llama_layout(windows: Callable[[Any, int], list[int | None]]) -> DecoderLayout:
    return DecoderLayout(
        embed="model.embed_tokens",
        layers="model.layers",
        final_norm="model.norm",
        rotary="model.rotary_emb",
        positions=None,
        norms=("input_layernorm", "post_attention_layernorm"),
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        fused_qkv="",
        attention_out="self_attn.o_proj",
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        activation="mlp.act_fn",
        parallel_residual=None,
        windows=windows,
        scalings=_head_dim_scalings,
    )


_TINY_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
}


def _chatml_tiny(config_class: str) -> TinyModel:
    """A tiny model with grouped key/value heads, tied embeddings and a ChatML tokenizer with a pad token."""
    return TinyModel(
        config_class,
        {**_TINY_SIZES, "num_key_value_heads": 2, "tie_word_embeddings": True},
        True,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    )


_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# GPT-2's layers are transformers' Conv1D (a linear layer with its weight transposed), and its `c_proj` is both
# the attention output and the MLP's second layer: "attn.c_proj" is the attention's only.
FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec(
            "llama",
            _LLAMA_STYLE,
            _llama_layout(_full_attention),
            _chatml_tiny("LlamaConfig"),
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
        FamilySpec(
            "mistral",
            _LLAMA_STYLE,
            _llama_layout(_mistral_windows),
            TinyModel(
                "MistralConfig",
                {**_TINY_SIZES, "num_key_value_heads": 2, "tie_word_embeddings": False, "sliding_window": 64},
                _MISTRAL_TEMPLATE,
                bos="<|im_start|>",
                eos="<|im_end|>",
                pad=None,
            ),
        ),
        FamilySpec(
            "qwen2",
            _LLAMA_STYLE,
            _llama_layout(_qwen2_windows),
            _chatml_tiny("Qwen2Config"),
        ),
        FamilySpec(
            "gpt2",
            {"attention": ["attn.c_attn", "attn.c_proj"], "all-linear": ["c_attn", "c_proj", "c_fc"]},
            DecoderLayout(
                embed="transformer.wte",
                layers="transformer.h",
                final_norm="transformer.ln_f",
                rotary=None,
                positions="transformer.wpe",
                norms=("ln_1", "ln_2"),
                qkv=("attn.c_attn",),
                fused_qkv="split",
                attention_out="attn.c_proj",
                mlp=("mlp.c_fc", "mlp.c_proj"),
                activation="mlp.act",
                parallel_residual=None,
                windows=_full_attention,
                scalings=_gpt2_scalings,
            ),
            TinyModel(
                "GPT2Config",
                {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024},
                False,
                bos="<|endoftext|>",
                eos="<|endoftext|>",
                pad=None,
            ),
        ),
        FamilySpec(
            "gpt_neox",
            {
                "attention": ["query_key_value", "dense"],
                "all-linear": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            },
            dataclasses.replace(  # Llama's norms, head, rotary embedding and attention scale
                _llama_layout(_full_attention),
                embed="gpt_neox.embed_in",
                layers="gpt_neox.layers",
                final_norm="gpt_neox.final_layer_norm",
                rotary="gpt_neox.rotary_emb",
                qkv=("attention.query_key_value",),
                fused_qkv="per-head",
                attention_out="attention.dense",
                mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
                activation="mlp.act",
                parallel_residual="use_parallel_residual",
            ),
            TinyModel(
                "GPTNeoXConfig",
                {**_TINY_SIZES, "tie_word_embeddings": False},
                False,
                bos="<|endoftext|>",
                eos="<|endoftext|>",
                pad=None,
            ),
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
    lora = dataclasses.replace(config.lora, target_modules=target_modules(model, config.lora.target_modules))
    return dataclasses.replace(config, lora=lora)
