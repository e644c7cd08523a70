"""The reference forward and backward of a llama-style decoder (llama, mistral, qwen2), over reprolora.numerics.

Every value below is a written-out sequence of operations with one answer: the correctly rounded products, sums,
exponentials, logarithms and square roots of reprolora.numerics, and single IEEE-754 float32 operations (+ - * /,
comparisons, selections), each its own tensor op. So a value depends on the weights and the tokens alone, not on
the CPU, the BLAS, the torch version or the thread count.

Tokens are packed: the examples of one pass are the rows of one [tokens, hidden] tensor; a product acts on each row
alone and attention on each example's own rows. Each element of a correctly rounded product is one number whatever
else the product holds, so how examples are grouped into passes (micro-batches, ranks, a decoding batch) changes
no bit, by construction.

Only the LoRA weights train. Backward is written out here rather than left to autograd, so that each gradient is
one stated sequence of those operations (autograd would add a tensor's incoming gradients in an order of its own).
The LoRA weight gradients are not formed per pass: each pass hands back, per adapted layer, the rows the
gradients are products of (`LoraRows`), and the training step multiplies the rows of all its passes at once, one
correctly rounded product over every labelled token of the step (reprolora.training.reference).

gpt2 and gpt_neox are not covered: they need LayerNorm, GELU and fused query/key/value layers, not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reprolora.core.errors import ReproloraError
from reprolora.models import families
from reprolora.models.reference_layers import (
    Dropout,
    Linear,
    Lora,
    LoraRows,
    attention,
    attention_backward,
    attention_mask,
    linear_backward,
    linear_forward,
    linear_of,
    lora_of,
    rms_norm,
    rms_norm_backward,
    rotary,
    rotary_backward,
    scalar,
)
from reprolora.numerics.matmul import matmul
from reprolora.numerics.pointwise import exp, log, rotary_tables, sigmoid, sqrt
from reprolora.numerics.reductions import sum as exact_sum

FAMILIES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------------------------------------- the decoder


@dataclass
class Layer:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    norm1: Tensor
    norm2: Tensor
    window: int | None


@dataclass
class Tape:
    """What a training forward keeps for backward, per layer and for the head."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)


class Decoder:
    """A llama, mistral or qwen2 causal LM (plain, merged, or a PeftModel's), run by the reference numerics."""

    def __init__(self, model: Any) -> None:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        config = model.config
        if config.model_type not in FAMILIES:
            raise ReproloraError(
                f"profile 'reference' runs model types {', '.join(FAMILIES)}, not "
                f"{config.model_type!r} (gpt2 and gpt_neox need LayerNorm and GELU, not written yet)"
            )
        scaling = getattr(config, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ReproloraError(f"profile 'reference' has no rotary scaling {scaling!r} yet: only the default rotary")
        self.config = config
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.base = float(getattr(config, "rope_theta", None) or (config.rope_parameters or {})["rope_theta"])
        self.eps = scalar(config.rms_norm_eps)
        self.scale = 1 / sqrt(scalar(self.head_dim))
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.head = linear_of(model.lm_head, "lm_head")
        windows = families.FAMILIES[config.model_type].decoder.windows(config, len(inner.layers))
        self.layers = []
        for i, layer in enumerate(inner.layers):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}"
            self.layers.append(
                Layer(
                    *(linear_of(getattr(attn, f"{n}_proj"), f"{prefix}.self_attn.{n}_proj") for n in "qkvo"),
                    *(linear_of(getattr(mlp, f"{n}_proj"), f"{prefix}.mlp.{n}_proj") for n in ("gate", "up", "down")),
                    layer.input_layernorm.weight.detach(),
                    layer.post_attention_layernorm.weight.detach(),
                    windows[i],
                )
            )
        self.cos = torch.empty(0, self.head_dim)
        self.sin = torch.empty(0, self.head_dim)

    @property
    def loras(self) -> list[Lora]:
        found = [
            lin.lora
            for layer in self.layers
            for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
        ]
        return [lora for lora in found + [self.head.lora] if lora is not None]

    def rotary_rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin [tokens, 1, head_dim] for `positions`: a table of the positions so far, grown as needed
        (each entry is defined by its position alone, so growing it changes none)."""
        needed = int(positions.max()) + 1
        if self.cos.shape[0] < needed:
            size = max(needed, 2 * self.cos.shape[0], 256)
            self.cos, self.sin = rotary_tables(torch.arange(size), self.head_dim, self.base)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    # ------------------------------------------------------------------------------------------------ forward

    def hidden(
        self, ids: Tensor, lengths: list[int], dropout: Dropout | None = None, tape: Tape | None = None
    ) -> Tensor:
        """The final-norm hidden states [tokens, hidden] of packed examples (`ids` [tokens], examples of `lengths`
        one after another, each from position 0). With a tape, what backward needs is kept on it."""
        positions = torch.cat([torch.arange(n) for n in lengths])
        cos, sin = self.rotary_rows(positions)
        x = self.embed[ids]
        for layer in self.layers:
            x = self.layer_forward(layer, x, lengths, cos, sin, dropout, tape)
        h, r = rms_norm(x, self.final_norm, self.eps)
        if tape is not None:
            tape.head.update(x=x, r=r)
        return h

    def layer_forward(
        self,
        layer: Layer,
        x: Tensor,
        lengths: list[int],
        cos: Tensor,
        sin: Tensor,
        dropout: Dropout | None,
        tape: Tape | None,
    ) -> Tensor:
        saved: dict[str, list] = {name: [] for name in ("q", "k", "v", "o", "gate", "up", "down")}
        n = x.shape[0]
        h1, r1 = rms_norm(x, layer.norm1, self.eps)
        q = linear_forward(layer.q, h1, dropout, saved["q"]).reshape(n, self.heads, self.head_dim)
        k = linear_forward(layer.k, h1, dropout, saved["k"]).reshape(n, self.kv_heads, self.head_dim)
        v = linear_forward(layer.v, h1, dropout, saved["v"]).reshape(n, self.kv_heads, self.head_dim)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        outs, examples = [], []
        start = 0
        for length in lengths:
            qe, ke, ve = (self._grouped(t[start : start + length]) for t in (q, k, v))
            out, p = attention(qe, ke, ve, self.scale, attention_mask(length, layer.window))
            outs.append(self._ungrouped(out))
            examples.append((qe, ke, ve, p))
            start += length
        attn_out = torch.cat(outs)
        x_mid = x + linear_forward(layer.o, attn_out, dropout, saved["o"])
        h2, r2 = rms_norm(x_mid, layer.norm2, self.eps)
        g = linear_forward(layer.gate, h2, dropout, saved["gate"])
        u = linear_forward(layer.up, h2, dropout, saved["up"])
        silu_g = g * sigmoid(g)
        a = silu_g * u
        out = x_mid + linear_forward(layer.down, a, dropout, saved["down"])
        if tape is not None:
            tape.layers.append(
                dict(x=x, r1=r1, examples=examples, x_mid=x_mid, r2=r2, g=g, u=u, silu_g=silu_g, saved=saved)
            )
        return out

    def _grouped(self, t: Tensor) -> Tensor:
        """[L, heads, d] -> [kv_heads, group, L, d] (query heads), or [L, kv_heads, d] -> [kv_heads, 1, L, d]."""
        length, heads, d = t.shape
        return t.permute(1, 0, 2).reshape(self.kv_heads, heads // self.kv_heads, length, d)

    def _ungrouped(self, t: Tensor) -> Tensor:
        """[kv_heads, group, L, d] -> [L, heads * d]."""
        kv, group, length, d = t.shape
        return t.reshape(kv * group, length, d).permute(1, 0, 2).reshape(length, kv * group * d)

    def logits(self, h: Tensor) -> Tensor:
        return linear_forward(self.head, h, None, [])

    # ------------------------------------------------------------------------------------------------ loss

    def loss_and_backward(
        self, ids: Tensor, lengths: list[int], targets: Tensor, dropout: Dropout | None
    ) -> tuple[Tensor, dict[str, LoraRows]]:
        """Per-token cross-entropy of next-token prediction at the labelled rows, and the LoRA gradient rows of
        their sum. `targets` [tokens]: the label each row predicts, or -1 where it predicts none."""
        tape = Tape()
        h = self.hidden(ids, lengths, dropout, tape)
        keep = targets >= 0
        logits = self.logits(h[keep])
        losses, dlogits = cross_entropy(logits, targets[keep])
        rows: dict[str, LoraRows] = {}
        dh = torch.zeros_like(h)
        dh[keep] = linear_backward(self.head, dlogits, [], rows)
        self.backward(dh, lengths, tape, rows)
        return losses, rows

    def backward(self, dh: Tensor, lengths: list[int], tape: Tape, rows: dict[str, LoraRows]) -> None:
        """From the gradient of the final-norm output down through every layer; only the LoRA rows are kept."""
        dx = rms_norm_backward(dh, tape.head["x"], tape.head["r"], self.final_norm)
        positions = torch.cat([torch.arange(n) for n in lengths])
        cos, sin = self.rotary_rows(positions)
        for layer, saved in zip(reversed(self.layers), reversed(tape.layers), strict=True):
            dx = self.layer_backward(layer, dx, saved, lengths, cos, sin, rows)

    def layer_backward(
        self,
        layer: Layer,
        dout: Tensor,
        s: dict[str, Any],
        lengths: list[int],
        cos: Tensor,
        sin: Tensor,
        rows: dict[str, LoraRows],
    ) -> Tensor:
        saved = s["saved"]
        # out = x_mid + down(silu(g) * u)
        da = linear_backward(layer.down, dout, saved["down"], rows)
        sig = sigmoid(s["g"])
        dsilu = sig * (1 + s["g"] * (1 - sig))
        dg = (da * s["u"]) * dsilu
        du = da * s["silu_g"]
        dh2 = linear_backward(layer.gate, dg, saved["gate"], rows) + linear_backward(layer.up, du, saved["up"], rows)
        dx_mid = dout + rms_norm_backward(dh2, s["x_mid"], s["r2"], layer.norm2)
        # x_mid = x + o(attention(rotary(q(h1)), rotary(k(h1)), v(h1)))
        dattn = linear_backward(layer.o, dx_mid, saved["o"], rows)
        n = dout.shape[0]
        dq, dk, dv = (torch.empty(n, heads, self.head_dim) for heads in (self.heads, self.kv_heads, self.kv_heads))
        start = 0
        for length, (qe, ke, ve, p) in zip(lengths, s["examples"], strict=True):
            dout_e = self._grouped(dattn[start : start + length].reshape(length, self.heads, self.head_dim))
            dqe, dke, dve = attention_backward(dout_e, qe, ke, ve, p, self.scale)
            for full, part in ((dq, dqe), (dk, dke), (dv, dve)):
                full[start : start + length] = self._ungrouped(part).reshape(length, -1, self.head_dim)
            start += length
        dq, dk = rotary_backward(dq, cos, sin), rotary_backward(dk, cos, sin)
        dh1 = linear_backward(layer.q, dq.reshape(n, -1), saved["q"], rows)
        dh1 = dh1 + linear_backward(layer.k, dk.reshape(n, -1), saved["k"], rows)
        dh1 = dh1 + linear_backward(layer.v, dv.reshape(n, -1), saved["v"], rows)
        return dx_mid + rms_norm_backward(dh1, s["x"], s["r1"], layer.norm1)


def cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: loss = (log(sum(exp(z - m))) + m) - z[target], m = max(z); and its gradient softmax(z) - onehot."""
    m = logits.amax(-1, keepdim=True)
    e = exp(logits - m)
    total = exact_sum(e, -1, keepdim=True)
    picked = logits.gather(-1, targets[:, None])
    losses = ((log(total) + m) - picked)[:, 0]
    grad = e / total
    rows = torch.arange(len(targets))
    grad[rows, targets] = grad[rows, targets] - 1
    return losses, grad


# ----------------------------------------------------------------------------------------------------- merge


def merge_lora(peft_model: Any) -> Any:
    """The base model with each LoRA layer folded into its weight, in place: W + (B A) * scaling, the product
    correctly rounded, then one float32 multiply and one float32 add (peft's merge, every number defined)."""
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            lora = lora_of(module, name)
            if lora is not None:
                weight = module.base_layer.weight
                weight.copy_(weight + matmul(lora.B.detach(), lora.A.detach()) * lora.scaling)
    return peft_model.unload()
