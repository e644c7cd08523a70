"""The correctly rounded float32 sum: the float32 nearest to the exact sum of a tensor's elements along a dimension.

Route: the sum in float64 (float32 values are exact in float64), whose error is at most gamma_n * sum|x| in any
order (Higham 4.2); where that interval holds no float32 rounding midpoint its float64 result's rounding is the
answer, and the rest is summed exactly by numerics.exact.round_exact_sums. Sums across micro-batches and ranks
are taken over the gathered terms in one call, so neither the micro-batch size nor the world size changes a bit.
"""

from __future__ import annotations

import builtins

import torch

from reprolora.numerics.exact import gamma, round_exact_sums, round_float64_interval


def sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:  # noqa: A001 (torch's name for it)
    """x summed along `dim`, each result the float32 nearest to the exact sum, ties to even; an empty or exactly
    zero sum is +0.0. Non-finite inputs give the float64 sum's non-finite result (one NaN)."""
    if x.dtype != torch.float32:
        raise TypeError(f"numerics.sum takes a float32 tensor, not {x.dtype}")
    x64 = x.to(torch.float64)
    n = x.shape[dim]
    total = x64.sum(dim, keepdim=True)
    # The last factor covers the absolute sum's own float64 rounding.
    error = x64.abs().sum(dim, keepdim=True) * (
        gamma(builtins.max(n, 1)) * (1 + 2 * gamma(builtins.max(n, 1)) + 2**-40)
    )
    rounded, decided = round_float64_interval(total, error)
    if not bool(decided.all()):
        terms = x64.movedim(dim, -1)
        flat_rounded = rounded.movedim(dim, -1).reshape(-1)
        where = (~decided).movedim(dim, -1).reshape(-1).nonzero().flatten()
        flat_rounded[where] = round_exact_sums(terms.reshape(-1, n)[where])
        rounded = flat_rounded.reshape(rounded.movedim(dim, -1).shape).movedim(-1, dim)
    return rounded if keepdim else rounded.squeeze(dim)
