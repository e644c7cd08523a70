"""numerics.matmul and numerics.sum against exact rational arithmetic: random inputs, inputs built to lie within
2^-60 of a float32 rounding midpoint (so the fallbacks run and are proven), ties, zeros, long inner dimensions,
broadcast batches, thread counts; and the error bound against the worst float64 summation order."""

from __future__ import annotations

import math
import random

import pytest
import torch

from reprolora.numerics import exact
from reprolora.numerics.exact import exact_sum, gamma, round_to_float32
from reprolora.numerics.matmul import FALLBACKS, error_bound, matmul, prepare
from reprolora.numerics.reductions import sum as exact_float32_sum


def oracle(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    rows, cols = a.double().tolist(), b.double().t().tolist()
    return [[round_to_float32(exact_sum([x * y for x, y in zip(r, c, strict=True)])) for c in cols] for r in rows]


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.int32).flatten().tolist()


def near_midpoint_rows(rng: random.Random, count: int) -> torch.Tensor:
    """Rows [hi, lo, t, 1, -1] whose dot with [1, 1, 1, 3, 3] is a float32 midpoint (hi + lo) plus t, |t| <= 2^-60
    of it or exactly 0 (a tie), with a cancelling pair that makes the float64 bound wide."""
    rows = []
    for _ in range(count):
        whole, exponent = rng.randint(2**23, 2**24 - 1), rng.randint(-20, 20)
        mid = math.ldexp(2 * whole + 1, exponent - 25)
        hi = float(torch.tensor(mid).float())
        rows.append([hi, mid - hi, math.ldexp(rng.choice([-1, 0, 1]), exponent - 62), 1.0, -1.0])
    return torch.tensor(rows, dtype=torch.float32)


def test_random_products_are_the_exact_products_rounded():
    torch.manual_seed(0)
    for m, k, n in [(7, 300, 5), (1, 1, 1), (3, 2, 9), (4, 3000, 3)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        assert matmul(a, b).tolist() == oracle(a, b)


def test_near_midpoints_take_the_fallback_and_come_out_exact():
    a = near_midpoint_rows(random.Random(1), 300)
    b = torch.tensor([[1.0], [1.0], [1.0], [3.0], [3.0]])
    before = exact.FALLBACKS["exact"]
    assert matmul(a, b).tolist() == oracle(a, b)
    assert exact.FALLBACKS["exact"] - before >= 200  # the float64 route and the compensated sum left them
    ties = a[a[:, 2] == 0]
    assert len(ties) > 50  # exact midpoints: ties to even
    for row, got in zip(ties.tolist(), matmul(ties, b).flatten().tolist(), strict=True):
        assert got == round_to_float32(exact_sum(row[:2]))


def test_the_compensated_sum_decides_what_the_float64_bound_leaves():
    torch.manual_seed(2)
    a, b = torch.randn(400, 1536), torch.randn(1536, 300)
    before = dict(exact.FALLBACKS), dict(FALLBACKS)
    result = matmul(a, b)
    undecided = FALLBACKS["undecided"] - before[1]["undecided"]
    assert 0 < undecided < 0.01 * result.numel()
    assert exact.FALLBACKS["compensated"] - before[0]["compensated"] > 0
    sample = torch.randperm(result.numel())[:40]
    rows, cols = sample // 300, sample % 300
    for i, j, got in zip(rows.tolist(), cols.tolist(), result.flatten()[sample].tolist(), strict=True):
        assert got == oracle(a[i : i + 1], b[:, j : j + 1])[0][0]


def test_zeros_signs_and_long_inner_dimensions():
    a = torch.tensor([[-0.0, -0.0], [1.0, -1.0], [0.0, 0.0]])
    b = torch.tensor([[1.0], [1.0]])
    assert bits(matmul(a, b)) == [0, 0, 0]  # exact zeros are +0.0
    tiny = torch.tensor([[-(2.0**-100)]])
    assert bits(matmul(tiny, torch.tensor([[2.0**-100]]))) == bits(torch.tensor([-0.0]))  # underflow keeps its sign
    torch.manual_seed(3)
    a, b = torch.randn(2, 5000), torch.randn(5000, 3)  # blocked: 5 float64 products added in order
    assert matmul(a, b).tolist() == oracle(a, b)


def test_broadcast_batches_and_threads_give_one_answer():
    torch.manual_seed(4)
    a, b = torch.randn(3, 1, 6, 40), torch.randn(4, 40, 5)
    result = matmul(a, b)
    assert result.shape == (3, 4, 6, 5)
    for i in range(3):
        for j in range(4):
            assert result[i, j].tolist() == oracle(a[i, 0], b[j])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul(a, b)
    finally:
        torch.set_num_threads(threads)
    assert bits(one) == bits(result)


def test_the_bound_covers_the_worst_summation_order():
    """a = [1, 2^-26, ...], b = [1, 2^-27 (1 + 2^-23), ...]: every product after the first is just over half an ulp
    of 1, so added left to right in float64 every addition rounds up, an error of almost gamma_K |a| |b|. matmul's
    bound must cover it (half of it would not)."""
    k = 1000
    a = torch.tensor([[1.0] + [2.0**-26] * (k - 1)])
    b = torch.tensor([[1.0] + [math.ldexp(1 + 2**-23, -27)] * (k - 1)]).t()
    terms = [x * y for x, y in zip(a.double().flatten().tolist(), b.double().flatten().tolist(), strict=True)]
    total = 0.0
    for t in terms:
        total += t
    error = float(abs(exact_sum([total]) - exact_sum(terms)))
    bound = float(error_bound(a.double(), prepare(b).norms, 1))
    assert 0.99 * gamma(k) < error <= bound < 1.01 * gamma(k)
    assert matmul(a, b).item() == round_to_float32(exact_sum(terms))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_sum_is_the_exact_sum_rounded(dim):
    torch.manual_seed(5)
    x = torch.randn(6, 700) * torch.logspace(-20, 20, 700)
    got = exact_float32_sum(x, dim)
    columns = x.double().movedim(dim, -1).reshape(-1, x.shape[dim]).tolist()
    assert got.flatten().tolist() == [round_to_float32(exact_sum(c)) for c in columns]
    assert exact_float32_sum(x, dim, keepdim=True).shape[dim] == 1


def test_sum_near_midpoints_and_empty():
    rows = near_midpoint_rows(random.Random(6), 100)
    got = exact_float32_sum(rows * torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0]), 1)
    assert got.tolist() == [round_to_float32(exact_sum([h, lo, t, 3.0, -3.0])) for h, lo, t, _, _ in rows.tolist()]
    assert bits(exact_float32_sum(torch.zeros(2, 0), 1)) == [0, 0]


def test_wrong_inputs_say_what_is_wrong():
    torch.manual_seed(7)
    a, b = torch.randn(5, 30), torch.randn(30, 4)
    assert bits(matmul(a, prepare(b))) == bits(matmul(a, b))
    with pytest.raises(TypeError, match="float32"):
        matmul(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(2, 3\)"):
        matmul(torch.ones(2, 3), torch.ones(2, 3))
