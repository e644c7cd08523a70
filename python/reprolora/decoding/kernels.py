"""The decoder's arithmetic (reprolora.decoding.generate): its linear layers, their products, and the rotary embedding.

Why a product's bits do not depend on the load or the thread count:
- a product with few outputs (at most NARROW: a LoRA layer's down-projection x A^T, r outputs, or a narrow
  projection) is a multiply and a sum over the input features, not a BLAS product: at a few rows and few outputs
  MKL splits the sum between threads (measured on the AMD EPYC: 12-32 outputs at 8 rows, 20-32 at 16, with 2 or
  4 threads), so its bits would follow the thread count; ATen's sum adds each output's terms in one fixed order on
  one thread, whatever the thread count and the number of rows;
- the wider products go to oneDNN with each weight packed once into its own layout (MKL repacks the weight on every
  call, which at a few rows costs more than the product); measured on the AMD EPYC, oneDNN's fp32 products of the
  model's shapes gave the same bits at 1, 2 and 4 threads at every row count from 1 to 69 and at 100-700, and a
  row's bits did not depend on the other rows' values. Under the `portable` profile, whose promise across CPU
  vendors rests on MKL's COMPATIBLE path, and off x86-64 (not measured), MKL does them.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch

from reprolora.core import pins
from reprolora.core.errors import ReproloraError

NARROW = 64  # products with at most this many outputs are summed by ATen (module docstring)
SUM_ROWS = 64  # rows per multiply-and-sum: bounds its [rows, outputs, in] temporary


@functools.cache
def packs_weights() -> bool:
    """Whether the decoder multiplies by oneDNN with packed weights (module docstring): on x86-64, not under
    `portable`. A process without pins (a test's) counts as `native`."""
    profile = pins.applied()["profile"] if pins.is_applied() else "native"
    return platform.machine() == "x86_64" and torch.backends.mkldnn.is_available() and profile != "portable"


class PackedWeights:
    """oneDNN's packed copies of linear layers' weights, by module: each packed once, and again only when the
    module's weight changes (a new tensor, or one changed in place: an optimizer step).

    The engine that multiplies by them holds them, so they live as long as it does; nothing is kept on the modules.
    """

    def __init__(self) -> None:
        self._by_module: dict[Any, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def product(self, module: Any, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x W^T + bias by oneDNN, `weight` being the module's W [out, in]."""
        cached = self._by_module.get(module)
        if cached is None or cached[0] is not module.weight or cached[1] != module.weight._version:
            cached = (
                module.weight,
                module.weight._version,
                torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None),
            )
            self._by_module[module] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[2], module.bias, "none", [], "")


def summed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for a narrow W [out, in] as a multiply and an ATen sum over the input features, SUM_ROWS rows at a time:
    each output's terms are added in one order on one thread, whatever the thread count and the number of rows."""
    return torch.cat([(rows.unsqueeze(1) * weight).sum(-1) for rows in x.split(SUM_ROWS)])


def linear(module: Any, x: torch.Tensor, packed: PackedWeights) -> torch.Tensor:
    """module(x) for a linear layer (nn.Linear, GPT-2's Conv1D, or a PEFT LoRA layer over one), with every product
    of at most NARROW outputs (a LoRA down-projection x A^T among them) computed by `summed`, not by the BLAS, and the
    wider ones by `packed` where `packs_weights()`.

    A PEFT LoRA layer is its base layer plus lora_B(x A^T) * scaling, as PEFT computes it; a merged one's base layer
    holds the merged weights."""
    lora_A = getattr(module, "lora_A", None)
    if lora_A is not None:
        result = linear(module.base_layer, x, packed)
        if module.disable_adapters or module.merged:
            return result
        for name in module.active_adapters:
            if name not in lora_A:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
                raise ReproloraError(f"the decoder runs plain LoRA layers, not DoRA or other variants ({name!r})")
            x_in = module.lora_dropout[name](x.to(lora_A[name].weight.dtype))
            down = linear(lora_A[name], x_in, packed)
            result = result + linear(module.lora_B[name], down, packed) * module.scaling[name]
        return result
    if isinstance(module, torch.nn.Linear):
        weight = module.weight
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
        weight = module.weight.t()
    else:
        return module(x)
    if weight.shape[0] > NARROW:
        if weight.dtype == torch.float32 and packs_weights():
            return packed.product(module, weight, x)
        return module(x)
    out = summed(x, weight)
    return out if module.bias is None else out + module.bias


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding on [n, heads, d] (GPT-NeoX: on the first rotary dims only)."""
    dims = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
