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
    + |value| * 2^-51) rounded to float64 still lies outside [x - error, x + error]'s complement. An exact zero
    gives +0.0; a non-finite value passes through (NaN as one NaN).
    """
    value = value.to(torch.float64)
    error = error.to(torch.float64)
    margin = error * (1 + 2**-48) + value.abs() * 2**-51
    low = (value - margin).to(torch.float32)
    high = (value + margin).to(torch.float32)
    decided = low.view(torch.int32) == high.view(torch.int32)
    exact = error == 0
    rounded = torch.where(
        exact & (value == 0), torch.zeros_like(high), torch.where(exact, value.to(torch.float32), high)
    )
    finite = torch.isfinite(value)
    rounded = torch.where(finite, rounded, value.to(torch.float32))
    rounded = torch.where(torch.isnan(value), torch.full_like(rounded, math.nan), rounded)
    return rounded, decided | exact | ~finite
