"""Rounding an exact rational number to float32: the one definition every operation in `numerics` answers by.

Each operation computes a fast float64 approximation, proves from an error bound that its float32 rounding is the
rounding of the exact value, and falls back to exact arithmetic (Python integers and fractions) for the few
elements the proof does not decide. This module is that exact last step, and the tests' oracle.
"""

from __future__ import annotations

import math
from fractions import Fraction

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
