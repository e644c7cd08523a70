"""The decoder's model arithmetic (reprolora.decoding.generate): a causal LM's forward written out over its Hugging
Face modules (embedding, norms, projections, MLP, output head), found where its family's DecoderLayout says
(reprolora.models.families) and called as they are, except the linear layers (reprolora.decoding.kernels).

The engine runs the layers and does the attention's bookkeeping (which keys each query sees, the caches); this
module computes: the embedding, a layer around its attention, one request's attention, the logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reprolora.core.errors import ReproloraError
from reprolora.decoding.kernels import PackedWeights, linear, rotate
from reprolora.models.families import FAMILIES

ROTARY_CHUNK = 64  # positions per rotary table chunk: a position's angle never depends on the total length


def module_at(root: Any, path: str) -> Any:
    """The module at dotted attribute `path` under `root`."""
    return functools.reduce(getattr, path.split("."), root)


@dataclass(frozen=True)
class Layer:
    """A decoder layer's modules, found where the family's DecoderLayout says."""

    norms: tuple[Any, Any]  # before the attention, before the MLP
    qkv: list[Any]  # q, k and v projections, or the one that gives all three
    attention_out: Any
    mlp: list[Any]  # (in, out) or (gate, up, down)
    activation: Any
    parallel_residual: bool  # attention and MLP both read the layer's input (GPT-NeoX)


class Forward:
    """The forward of one causal LM (its PEFT LoRA layers included), its wide products' weights packed once."""

    def __init__(self, model: Any) -> None:
        config = model.config
        if config.model_type not in FAMILIES:
            raise ReproloraError(f"the decoder knows model types {', '.join(FAMILIES)}, not {config.model_type!r}")
        layout = FAMILIES[config.model_type].decoder
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.fused_qkv = layout.fused_qkv
        self.embed, self.final_norm = module_at(model, layout.embed), module_at(model, layout.final_norm)
        # transformers' own accessor: GPT-NeoX's head is `embed_out` in older transformers (4.56), `lm_head` later
        self.head = model.get_output_embeddings()
        self.positions = module_at(model, layout.positions) if layout.positions else None
        self.rotary = module_at(model, layout.rotary) if layout.rotary else None
        self.layers = [
            Layer(
                (module_at(layer, layout.norms[0]), module_at(layer, layout.norms[1])),
                [module_at(layer, path) for path in layout.qkv],
                module_at(layer, layout.attention_out),
                [module_at(layer, path) for path in layout.mlp],
                module_at(layer, layout.activation),
                bool(layout.parallel_residual and getattr(layer, layout.parallel_residual)),
            )
            for layer in module_at(model, layout.layers)
        ]
        self.windows = layout.windows(config, len(self.layers))  # each layer's sliding window, None: none
        self.scalings = layout.scalings(config, len(self.layers), self.head_dim)
        self.packed = PackedWeights()
        self.cos: torch.Tensor | None = None  # rotary table, [positions, rotary dims]
        self.sin: torch.Tensor | None = None

    def rotary_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos and sin rows for `positions` (None without a rotary embedding), from a table grown chunk by chunk by
        the model's own rotary module."""
        if self.rotary is None:
            return None, None
        needed = int(positions.max()) + 1
        if self.cos is None or self.cos.shape[0] < needed:
            chunks = -(-needed // ROTARY_CHUNK)
            positions_table = torch.arange(chunks * ROTARY_CHUNK).reshape(chunks, ROTARY_CHUNK)
            pairs = [self.rotary(torch.zeros(1, dtype=torch.float32), row.unsqueeze(0)) for row in positions_table]
            self.cos = torch.cat([cos[0] for cos, _ in pairs])
            self.sin = torch.cat([sin[0] for _, sin in pairs])
        return self.cos[positions], self.sin[positions]

    def embed_rows(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.positions is not None:
            x = x + self.positions(positions)
        return x

    def layer(
        self,
        index: int,
        x: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        """Layer `index` on x [n, hidden]; `attend(index, q, k, v)` gives its attention's [n, heads, d]."""
        layer = self.layers[index]
        q, k, v = self._qkv(layer, layer.norms[0](x))
        if cos is not None:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attend(index, q, k, v).reshape(x.shape[0], self.heads * self.head_dim)
        attention = self._linear(layer.attention_out, out)
        if layer.parallel_residual:
            return self._mlp(layer, layer.norms[1](x)) + attention + x
        x = x + attention
        return x + self._mlp(layer, layer.norms[1](x))

    def attention(
        self,
        index: int,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v for one request: q [n, heads, d], keys/values [kv_heads, L, d] -> [n, heads, d].

        torch's scaled_dot_product_attention on a batch of one, as training runs it: 4-D inputs take its fused CPU
        (flash) kernel, which gives the same bits at any thread count, where a matmul + softmax written out here did
        not (1 against 2 threads, default model, native pins); 3-D inputs would take its slower math path.
        `allowed` [n, L] marks the keys each query may see; `causal` says the usual causal mask instead.
        """
        # enable_gqa: each key/value head serves consecutive query heads, as transformers' repeat_kv
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None],
            values[None],
            attn_mask=allowed,
            is_causal=causal,
            scale=self.scalings[index],
            enable_gqa=self.heads != self.kv_heads,
        )
        return out[0].transpose(0, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(self.head, self.final_norm(x)).float()

    def _linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return linear(module, x, self.packed)

    def _qkv(self, layer: Layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, d], k and v [n, kv_heads, d] of the normed input `h` [n, hidden]."""
        n, d = h.shape[0], self.head_dim
        if len(layer.qkv) == 3:
            q, k, v = (self._linear(projection, h) for projection in layer.qkv)
        elif self.fused_qkv == "per-head":
            q, k, v = self._linear(layer.qkv[0], h).view(n, self.heads, 3 * d).chunk(3, dim=-1)
        else:
            q, k, v = self._linear(layer.qkv[0], h).split(self.heads * d, dim=-1)
        return q.reshape(n, self.heads, d), k.reshape(n, self.kv_heads, d), v.reshape(n, self.kv_heads, d)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The family's MLP, as transformers writes it (GPT-2's dropout: none at inference)."""
        if len(layer.mlp) == 3:
            gate, up, down = layer.mlp
            return self._linear(down, layer.activation(self._linear(gate, x)) * self._linear(up, x))
        first, second = layer.mlp
        return self._linear(second, layer.activation(self._linear(first, x)))
