"""The decoding engine of profile `reference`: generate.Engine's scheduling (batches of rows, guessed tokens,
stop checks, the key/value cache) with every number computed by the reference decoder (reprolora.models.reference).

Batch invariance needs no measured fact here: each element of a correctly rounded product is one number whatever
else the product holds, a masked key adds an exact zero to an exact sum, so a row's logits are the same alone, in
any batch, with or without a cache, and equal to the training forward's at that position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprolora.decoding.generate import Engine, Sequence
from reprolora.models.reference import Decoder
from reprolora.models.reference_layers import attention, attention_mask, linear_forward, rms_norm, rotary
from reprolora.numerics.pointwise import sigmoid


class ReferenceEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, guess: bool = True) -> None:
        super().__init__(model, tokenizer, guess)
        self.decoder = Decoder(self.model)

    def _forward(self, ids: list[int], positions: Tensor, attend: Any) -> Tensor:
        """The final-norm hidden rows of `ids` at `positions`; `attend(index, q, k, v)` does each layer's attention
        on q [n, heads, d], k and v [n, kv_heads, d], returning [n, heads * d]."""
        dec = self.decoder
        cos, sin = dec.rotary_rows(positions)
        x = dec.embed[torch.tensor(ids, dtype=torch.long)]
        n = len(ids)
        for index, layer in enumerate(dec.layers):
            h1, _ = rms_norm(x, layer.norm1, dec.eps)
            q = linear_forward(layer.q, h1, None, []).reshape(n, dec.heads, dec.head_dim)
            k = linear_forward(layer.k, h1, None, []).reshape(n, dec.kv_heads, dec.head_dim)
            v = linear_forward(layer.v, h1, None, []).reshape(n, dec.kv_heads, dec.head_dim)
            out = attend(index, rotary(q, cos, sin), rotary(k, cos, sin), v)
            x = x + linear_forward(layer.o, out, None, [])
            h2, _ = rms_norm(x, layer.norm2, dec.eps)
            g = linear_forward(layer.gate, h2, None, [])
            a = (g * sigmoid(g)) * linear_forward(layer.up, h2, None, [])
            x = x + linear_forward(layer.down, a, None, [])
        return rms_norm(x, dec.final_norm, dec.eps)[0]

    def _attend_cached(self, index: int, q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor) -> Tensor:
        """q [n, heads, d] against keys/values [kv_heads, L, d] -> [n, heads * d]."""
        dec = self.decoder
        n = q.shape[0]
        qg = q.permute(1, 0, 2).reshape(dec.kv_heads, dec.heads // dec.kv_heads, n, dec.head_dim)
        out, _ = attention(qg, keys.unsqueeze(1), values.unsqueeze(1), dec.scale, allowed)
        return out.reshape(dec.heads, n, dec.head_dim).permute(1, 0, 2).reshape(n, dec.heads * dec.head_dim)

    def _prefill(self, sequence: Sequence) -> Tensor:
        n = len(sequence.prompt_ids)

        def attend(index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self._store(sequence, index, k, v, 0)
            return self._attend_cached(
                index, q, k.transpose(0, 1), v.transpose(0, 1), attention_mask(n, self.decoder.layers[index].window)
            )

        h = self._forward(sequence.prompt_ids, torch.arange(n), attend)
        sequence.length = n
        return self.decoder.logits(h[-1:])

    def _decode(self, rows: list[tuple[Sequence, int, int]]) -> Tensor:
        """Logits of `rows` (sequence, input token, its position); a sequence's rows at consecutive positions."""
        starts = [row for row in range(len(rows)) if row == 0 or rows[row][0] is not rows[row - 1][0]]
        spans = list(zip(starts, starts[1:] + [len(rows)], strict=True))

        def attend(index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            for start, end in spans:
                self._store(rows[start][0], index, k[start:end], v[start:end], rows[start][2])
            window = self.decoder.layers[index].window
            outs = []
            for row, (sequence, _, at) in enumerate(rows):
                first = max(0, at + 1 - window) if window is not None else 0
                keys = sequence.keys[index][:, first : at + 1]
                values = sequence.values[index][:, first : at + 1]
                everything = torch.ones(1, at + 1 - first, dtype=torch.bool)
                outs.append(self._attend_cached(index, q[row : row + 1], keys, values, everything))
            return torch.cat(outs)

        positions = torch.tensor([at for _, _, at in rows])
        h = self._forward([token for _, token, _ in rows], positions, attend)
        return self.decoder.logits(h)
