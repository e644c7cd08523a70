"""The correctly rounded float32 matrix product: each element the float32 nearest to the exact dot product.

Route: the product in float64 through whatever BLAS torch has. A product of two float32 values is exact in
float64 (48 significant bits, exponents far from float64's limits), so the float64 result differs from the exact
dot product only by its additions: by at most gamma_K * sum_k |a_k b_k| in any order of summation, with or
without FMA (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), and sum_k |a_k b_k| <= |a|_2 |b|_2
(Cauchy-Schwarz). This assumes only that the BLAS does IEEE float64 arithmetic and sums each element's K
products in some order (every BLAS torch builds with does; none uses Strassen-like schemes). Where that
interval holds no float32 rounding midpoint (numerics.exact.round_float64_interval), the float64 result's
rounding is the answer, whichever BLAS, ISA or thread count computed it; the few elements left (a fraction of
about K * 2^-29 * |a||b| / |ab|) are summed again from their exact products by numerics.exact.round_exact_sums.

Long inner dimensions (the output head's backward has K = 49152) are cut into blocks of BLOCK products, each
block a float64 product and the blocks added in order, so the bound is (gamma_BLOCK + gamma_blocks) |a||b|
instead of gamma_K |a||b|: the fallback stays rare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reprolora.numerics.exact import CHUNK, gamma, round_exact_sums, round_float64_interval

BLOCK = 1024  # the longest inner dimension taken as one float64 product
FALLBACKS = {"elements": 0, "undecided": 0}  # elements computed, and those the float64 route left undecided


@dataclass(frozen=True)
class Prepared:
    """A right operand multiplied many times (a frozen weight): its float64 copy and column norms, made once."""

    float64: torch.Tensor  # [..., K, N]
    norms: torch.Tensor  # [..., 1, N]: |b_col|_2, rounded as error_bound allows

    @property
    def shape(self) -> torch.Size:
        return self.float64.shape


def prepare(b: torch.Tensor) -> Prepared:
    """b ready to be matmul's right operand again and again; matmul(a, prepare(b)) == matmul(a, b), bit for bit."""
    _check_float32(b)
    b64 = b.to(torch.float64)
    return Prepared(b64, _column_norms(b64))


def matmul(a: torch.Tensor, b: torch.Tensor | Prepared) -> torch.Tensor:
    """a @ b for float32 a [..., M, K] and b [..., K, N] (batch dimensions broadcast as torch.matmul's do), each
    element the float32 nearest to the exact sum of its K products, ties to even; an exact zero is +0.0.
    Non-finite inputs give the float64 product's non-finite result (one NaN)."""
    _check_float32(a)
    if a.dim() < 2 or len(b.shape) < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"numerics.matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not multiply")
    prepared = b if isinstance(b, Prepared) else prepare(b)
    a64, b64 = a.to(torch.float64), prepared.float64
    k = a.shape[-1]
    product, blocks = _blocked_product(a64, b64, k)
    rounded, decided = round_float64_interval(product, error_bound(a64, prepared.norms, blocks))
    FALLBACKS["elements"] += rounded.numel()
    if not bool(decided.all()):
        _exact_where_undecided(rounded, decided, a64, b64)
    return rounded


def _check_float32(t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"numerics.matmul takes float32 tensors, not {t.dtype}")


def _column_norms(b64: torch.Tensor) -> torch.Tensor:
    return (b64 * b64).sum(-2, keepdim=True).sqrt()


def error_bound(a64: torch.Tensor, b_norms: torch.Tensor, blocks: int) -> torch.Tensor:
    """An upper bound on |float64 product - exact product| per element, for the product taken in `blocks` blocks,
    from a's rows and b's column norms (_column_norms)."""
    k = a64.shape[-1]
    block = min(k, BLOCK)
    # |a_row|_2 |b_col|_2 bounds sum|a_k b_k|; the last factor covers the norms' own float64 rounding (their sums of
    # squares by gamma_K, the square roots, the products) with room to spare.
    factor = (gamma(block) + gamma(blocks) * (1 + gamma(block))) * (1 + 2 * gamma(k) + 2**-40)
    return (a64 * a64).sum(-1, keepdim=True).sqrt().mul_(factor) * b_norms


def _blocked_product(a64: torch.Tensor, b64: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    if k <= BLOCK:
        return torch.matmul(a64, b64), 1
    starts = range(0, k, BLOCK)
    product = torch.matmul(a64[..., :BLOCK], b64[..., :BLOCK, :])
    for start in starts[1:]:
        product = product + torch.matmul(a64[..., start : start + BLOCK], b64[..., start : start + BLOCK, :])
    return product, len(starts)


def _exact_where_undecided(rounded: torch.Tensor, decided: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor) -> None:
    """Fill the undecided elements of `rounded` in place from their exact products."""
    batch = rounded.shape[:-2]
    m, n = rounded.shape[-2:]
    a_rows = a64.expand(*batch, m, a64.shape[-1]).reshape(-1, m, a64.shape[-1])
    b_cols = b64.expand(*batch, b64.shape[-2], n).reshape(-1, b64.shape[-2], n)
    flat = rounded.view(-1)
    where = (~decided).reshape(-1).nonzero().flatten()
    FALLBACKS["undecided"] += len(where)
    step = max(1, CHUNK // a64.shape[-1])
    for chunk in where.split(step):
        index_b, rest = chunk // (m * n), chunk % (m * n)
        index_m, index_n = rest // n, rest % n
        terms = a_rows[index_b, index_m, :] * b_cols[index_b, :, index_n]  # exact float64 products
        flat[chunk] = round_exact_sums(terms)
