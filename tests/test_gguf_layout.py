"""llama.cpp's tensor layout (reprolora.models.gguf_layout): one table, read both ways, each the other's inverse."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from reprolora.core.errors import ReproloraError
from reprolora.export import export_gguf
from reprolora.models import gguf_layout

CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2}


def test_every_tiny_llama_tensor_round_trips_through_gguf(tiny_base_model):
    tensors = load_file(str(tiny_base_model / "model.safetensors"))
    exported = export_gguf.gguf_tensors(tensors, CONFIG)
    assert len(exported) == len(tensors)
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.0.ffn_norm.weight"} <= set(exported)
    back = {}
    for gguf_name, weights in exported.items():
        heads = gguf_layout.rotary_heads(gguf_name, CONFIG)
        back[gguf_layout.from_gguf(gguf_name)] = weights if heads is None else gguf_layout.unpermute(weights, heads)
    assert set(back) == set(tensors)
    for name, weights in tensors.items():
        assert np.array_equal(back[name], weights), name
    # q and k really are reordered (a permutation that did nothing would round-trip too).
    assert not np.array_equal(exported["blk.0.attn_q.weight"], tensors["model.layers.0.self_attn.q_proj.weight"])
    assert np.array_equal(exported["blk.0.attn_v.weight"], tensors["model.layers.0.self_attn.v_proj.weight"])


def test_permute_interleaves_the_rotary_halves_of_each_head():
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: halves (0 1 | 2 3), (4 5 | 6 7)
    assert gguf_layout.permute(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert np.array_equal(gguf_layout.unpermute(gguf_layout.permute(rows, 2), 2), rows)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.mlp.up_proj.bias"])
def test_a_tensor_without_a_place_is_refused(name):
    with pytest.raises(ReproloraError, match="has no place in llama.cpp's Llama layout"):
        gguf_layout.to_gguf(name)


def test_an_unknown_gguf_tensor_is_refused():
    with pytest.raises(ReproloraError, match="has no place in the Hugging Face Llama layout"):
        gguf_layout.from_gguf("blk.0.attn_qkv.weight")
