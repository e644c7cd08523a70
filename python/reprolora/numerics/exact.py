"""Rounding an exact rational number to float32: the one definition every operation in `numerics` answers by.

Each operation computes a fast float64 approximation, proves from an error bound that its float32 rounding is the
rounding of the exact value, and falls back to exact arithmetic (Python integers and fractions) for the few
elements the proof does not decide. This module holds both ends of that: the rounding test on a float64 value
with an error bound, and the exact last step (also the tests' oracle).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

MANTISSA_BITS = 24  # float32's significand, the implicit bit included
MIN_EXPONENT = -126  # the smallest normal float32 is 2^-126
SUBNORMAL_QUANTUM = MIN_EXPONENT - MANTISSA_BITS + 1  # -149: subnormals are multiples of 2^-149
MAX_FLOAT32 = math.ldexp(2**MANTISSA_BITS - 1, 128 - MANTISSA_BITS)  # (2 - 2^-23) * 2^127


def round_to_float32(value: Fraction | int) -> float:
    """The float32 nearest to the exact rational `value`, ties to even (IEEE 754 roundTiesToEven), returned as the
    Python float that holds it exactly.

    Subnormal results are rounded on their fixed grid of 2^-149. A value whose magnitude reaches the midpoint
    between the largest float32 and 2^128 rounds to infinity, as IEEE 754 overflow does. An exact zero gives +0.0.
    """
    value = Fraction(value)
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    magnitude = abs(value)
    numerator, denominator = magnitude.numerator, magnitude.denominator
    # The binade: 2^exponent <= magnitude < 2^(exponent + 1).
    exponent = numerator.bit_length() - denominator.bit_length()
    if _scaled(numerator, denominator, exponent) < 1:
        exponent -= 1
    quantum = max(exponent - MANTISSA_BITS + 1, SUBNORMAL_QUANTUM)
    # magnitude / 2^quantum = whole + remainder / denominator', with 0 <= remainder < denominator'.
    if quantum >= 0:
        whole, remainder = divmod(numerator, denominator << quantum)
        scaled_denominator = denominator << quantum
    else:
        whole, remainder = divmod(numerator << -quantum, denominator)
        scaled_denominator = denominator
    twice = 2 * remainder
    if twice > scaled_denominator or (twice == scaled_denominator and whole % 2 == 1):
        whole += 1
    if whole.bit_length() + quantum > 128:
        return sign * math.inf  # rounded to 2^128 or beyond: past the midpoint after the largest float32
    return sign * math.ldexp(whole, quantum)


def _scaled(numerator: int, denominator: int, exponent: int) -> Fraction:
    return (
        Fraction(numerator, denominator << exponent) if exponent >= 0 else Fraction(numerator << -exponent, denominator)
    )


def round_float64_interval(value: torch.Tensor, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 rounding of exact numbers known only as float64 `value` +- `error`, where that bound decides it.

    For each element, the exact number x satisfies |x - value| <= error (the caller proves the bound; error = 0
    says value is x). Where both ends of the interval round to the same float32, bit for bit, every number in
    it does (rounding is monotone), so that float32 is x's rounding: `decided` is True there and `rounded` holds
    it. Elsewhere (a rounding midpoint may lie inside) `decided` is False and the caller computes x exactly.

    The ends are computed in float64 and widened first to cover their own rounding: value -+ (error * (1 + 2^-48)
    + |value| * 2^-51) rounded to float64 still lies outside [x - error, x + error]. How the widening itself is
    rounded (fused or not) changes only which elements are decided, never a decided element's value. An exact
    zero gives +0.0; a non-finite value passes through.
    """
    value = value.to(torch.float64)
    margin = value.abs().mul_(2**-51).add_(error.to(torch.float64), alpha=1 + 2**-48)
    low = (value - margin).to(torch.float32)
    high = value.add(margin).to(torch.float32)
    decided = low.view(torch.int32) == high.view(torch.int32)
    undecided = (~decided).nonzero(as_tuple=True)
    if len(undecided[0]):
        # Exact values (error 0; an exact zero as +0.0) and non-finite ones are decided as they stand.
        v, e = value[undecided], error.to(torch.float64).expand_as(value)[undecided]
        exact = (e == 0) | ~torch.isfinite(v)
        high[undecided] = torch.where(exact & (v == 0), torch.zeros_like(v), v).to(torch.float32)
        decided[undecided] = exact
    return high, decided


FALLBACKS: dict[str, int] = {"compensated": 0, "exact": 0}  # elements each fallback stage decided, for tests
CHUNK = 1 << 22  # float64 terms per fallback chunk: 32 MiB


def round_exact_sums(terms: torch.Tensor) -> torch.Tensor:
    """The float32 rounding of each row's exact sum, for a [rows, n] float64 tensor whose values are the terms
    (exact products or float32 values): the fallback of every sum and product the float64 route leaves undecided.

    First a compensated sum, exact but for its last float64 addition: a pairwise tree of error-free additions
    (Knuth's TwoSum, six IEEE operations each, so the tree's sum plus every addition's error is the exact sum),
    then the errors summed in float64. Its error is at most gamma_(n-1) * sum|errors| (the errors' own float64
    sum) plus the last rounding, and it goes through round_float64_interval. What that leaves (ties, and sums
    within ~2^-52 of a midpoint) is summed exactly in Python integers and rounded by round_to_float32.
    """
    rows, n = terms.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.float32)
    if rows * n > CHUNK and rows > 1:
        step = max(1, CHUNK // n)
        return torch.cat([round_exact_sums(terms[i : i + step]) for i in range(0, rows, step)])
    x = terms.to(torch.float64)
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        x = torch.cat([x, x.new_zeros(rows, width - n)], dim=1)
    errors = []
    while x.shape[1] > 1:
        a, b = x[:, 0::2], x[:, 1::2]
        s = a + b
        b_virtual = s - a
        errors.append((a - (s - b_virtual)) + (b - b_virtual))
        x = s
    if errors:
        e = torch.cat(errors, dim=1)
        value = x[:, 0] + e.sum(dim=1)
        # gamma_(n-1) for the errors' sum, inflated for that bound's own rounding; then the last addition.
        error = e.abs().sum(dim=1) * (gamma(width) * (1 + 4 * gamma(width))) + value.abs() * 2**-52
    else:
        value, error = x[:, 0], torch.zeros(rows, dtype=torch.float64)
    rounded, decided = round_float64_interval(value, error)
    undecided = (~decided).nonzero().flatten()
    FALLBACKS["compensated"] += rows - len(undecided)
    if len(undecided):
        FALLBACKS["exact"] += len(undecided)
        exact = [round_to_float32(exact_sum(terms[i].tolist())) for i in undecided.tolist()]
        rounded[undecided] = torch.tensor(exact, dtype=torch.float32)
    return rounded


def exact_sum(values: list[float]) -> Fraction:
    """The exact sum of float64 values, as a Fraction (integers over one power-of-two denominator: fast)."""
    numerators, shifts = [], []
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"exact_sum: non-finite term {v}")
        n, d = v.as_integer_ratio()
        numerators.append(n)
        shifts.append(d.bit_length() - 1)
    top = max(shifts, default=0)
    return Fraction(sum(n << (top - s) for n, s in zip(numerators, shifts, strict=True)), 1 << top)


def midpoint_distance(value: Fraction) -> float:
    """|value - nearest float32 rounding midpoint| / |value|, for a nonzero value in float32's normal range: how
    close an exact result lies to a rounding boundary (the hard cases of the tests and benchmarks/)."""
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    quantum = Fraction(2) ** (exponent - MANTISSA_BITS + 1)
    offset = magnitude / quantum - int(magnitude / quantum)
    return float(abs(offset - Fraction(1, 2)) * quantum / magnitude)


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), u = 2^-53: the relative bound on any float64 sum of n terms, rounded up."""
    if n >= 1 << 40:
        raise ValueError(f"gamma: {n} terms is beyond the bounds this module proves")
    unit = 2.0**-53
    return n * unit / (1 - n * unit) * (1 + 2**-50)
