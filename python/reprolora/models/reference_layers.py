"""The layers of the reference decoder (reprolora.models.reference): linear layers with LoRA, RMSNorm, rotary
embeddings and attention, forward and backward, each a written-out sequence of reprolora.numerics' correctly rounded
operations and single IEEE-754 float32 operations, each its own tensor op (no fused multiply-add)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reprolora.numerics.matmul import Prepared, matmul, prepare
from reprolora.numerics.pointwise import exp, sqrt
from reprolora.numerics.reductions import sum as exact_sum

F32 = torch.float32


def scalar(value: float) -> Tensor:
    """A float32 constant: `value` rounded once to float32 (IEEE round to nearest)."""
    return torch.tensor(value, dtype=torch.float64).to(F32)


# ---------------------------------------------------------------------------------------------------- layers


@dataclass
class Lora:
    """One adapted layer's LoRA: y += (B (A dropout(x))) * scaling. A and B are peft's own parameters, trained
    in place."""

    name: str  # the layer's module path: it keys the layer's dropout masks
    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scaling: Tensor  # float32 alpha / r
    dropout: float


@dataclass
class Linear:
    weight: Tensor  # [out, in], frozen
    forward_right: Prepared  # W^T [in, out], the forward product's right side
    backward_right: Prepared  # W [out, in], the input gradient's
    bias: Tensor | None
    lora: Lora | None


@dataclass
class LoraRows:
    """What one pass gives an adapted layer's weight gradients, one row per token:
    dB = (dy * scaling)^T u and dA = du^T dropout(x), summed over every token of the step."""

    scaled_dy: Tensor  # [tokens, out]
    u: Tensor  # [tokens, r]: A dropout(x)
    du: Tensor  # [tokens, r]
    x: Tensor  # [tokens, in]: dropout(x)


def lora_of(module: Any, name: str) -> Lora | None:
    """The LoRA of a peft LoRA layer (its "default" adapter); None for a plain nn.Linear."""
    if not (hasattr(module, "lora_A") and "default" in module.lora_A):
        return None
    return Lora(
        name,
        module.lora_A["default"].weight,
        module.lora_B["default"].weight,
        scalar(module.scaling["default"]),
        float(getattr(module.lora_dropout["default"], "p", 0.0)),
    )


def linear_of(module: Any, name: str) -> Linear:
    """A Linear from an nn.Linear, or from a peft LoRA layer wrapping one."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach()
    bias = base.bias.detach() if base.bias is not None else None
    return Linear(weight, prepare(weight.t().contiguous()), prepare(weight), bias, lora_of(module, name))


Dropout = Callable[[Lora, Tensor], Tensor]  # (layer, x) -> the keep mask scaled by 1 / (1 - p), per element of x


def linear_forward(lin: Linear, x: Tensor, dropout: Dropout | None, saved: list) -> Tensor:
    """x W^T (+ bias) (+ LoRA), saving what backward needs."""
    y = matmul(x, lin.forward_right)
    if lin.bias is not None:
        y = y + lin.bias
    if lin.lora is None:
        return y
    lora = lin.lora
    mask = dropout(lora, x) if dropout is not None and lora.dropout > 0 else None
    xd = x * mask if mask is not None else x
    u = matmul(xd, lora.A.detach().t())
    t = matmul(u, lora.B.detach().t()) * lora.scaling
    saved.append((xd, u, mask))
    return y + t


def linear_backward(lin: Linear, dy: Tensor, saved: list, rows: dict[str, LoraRows]) -> Tensor:
    """dx of linear_forward; an adapted layer's gradient rows go into `rows`."""
    dx = matmul(dy, lin.backward_right)
    if lin.lora is None:
        return dx
    lora = lin.lora
    xd, u, mask = saved.pop()
    scaled_dy = dy * lora.scaling
    du = matmul(scaled_dy, lora.B.detach())
    dxd = matmul(du, lora.A.detach())
    if mask is not None:
        dxd = dxd * mask
    rows[lora.name] = LoraRows(scaled_dy, u, du, xd)
    return dx + dxd


def rms_norm(x: Tensor, weight: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """weight * (x * r), r = 1 / sqrt(sum(x * x) / d + eps) per row; returns the output and r."""
    ms = exact_sum(x * x, -1, keepdim=True) / scalar(x.shape[-1])
    r = 1 / sqrt(ms + eps)
    return weight * (x * r), r


def rms_norm_backward(dy: Tensor, x: Tensor, r: Tensor, weight: Tensor) -> Tensor:
    """dx = dn r + x c, dn = dy weight, c = -(sum(dn x) r r r) / d: the derivative of rms_norm, written out."""
    dn = dy * weight
    c = exact_sum(dn * x, -1, keepdim=True) * r
    c = c * r
    c = c * r
    c = -(c / scalar(x.shape[-1]))
    return dn * r + x * c


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_backward(g: Tensor) -> Tensor:
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotary embedding, x cos + rotate_half(x) sin, on x [tokens, heads, head_dim]."""
    return x * cos + rotate_half(x) * sin


def rotary_backward(g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return g * cos + rotate_half_backward(g * sin)


# ---------------------------------------------------------------------------------------------------- attention


def attention_mask(length: int, window: int | None) -> Tensor:
    """[query, key]: a key at or before its query, and within the window."""
    positions = torch.arange(length)
    allowed = positions[None, :] <= positions[:, None]
    if window is not None:
        allowed &= positions[None, :] > positions[:, None] - window
    return allowed


def softmax_rows(scores: Tensor, allowed: Tensor) -> Tensor:
    """exp(s - max) / sum(exp(s - max)) over the allowed keys of each row; exactly 0 elsewhere."""
    masked = torch.where(allowed, scores, torch.tensor(float("-inf")))
    shifted = torch.where(allowed, scores - masked.amax(-1, keepdim=True), torch.tensor(0.0))
    e = torch.where(allowed, exp(shifted), torch.tensor(0.0))
    return e / exact_sum(e, -1, keepdim=True)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v for one example: q [kv_heads, group, L, d], k and v [kv_heads, 1, L, d] (each
    key/value head serves `group` consecutive query heads). Returns the output and the probabilities."""
    scores = matmul(q, k.transpose(-1, -2)) * scale
    p = softmax_rows(scores, allowed)
    return matmul(p, v), p


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `attention`. A key/value head's gradient sums over the query heads it serves as one product
    over their rows together."""
    kv, group, length, d = q.shape
    dp = matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - exact_sum(p * dp, -1, keepdim=True))
    ds = ds * scale
    dq = matmul(ds, k)

    def over_group(m: Tensor, right: Tensor) -> Tensor:  # sum over the group of m_g^T right_g
        left = m.transpose(-1, -2).permute(0, 2, 1, 3).reshape(kv, length, group * length)
        return matmul(left, right.reshape(kv, group * length, d)).unsqueeze(1)

    return dq, over_group(ds, q), over_group(p, dout)
