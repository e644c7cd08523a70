"""numerics.exact.round_to_float32 against numpy's float64 -> float32 conversion (IEEE round-to-nearest-even)
where the exact value is a float64, and against hand-made ties, subnormals and overflow."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from reprolora.numerics.exact import MAX_FLOAT32, round_to_float32


def test_matches_ieee_conversion_of_random_doubles() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**64, size=20000, dtype=np.uint64)
    doubles = bits.view(np.float64)
    doubles = doubles[np.isfinite(doubles)]
    # Concentrate on float32's range too, subnormals included: scale random mantissas into it.
    scaled = np.ldexp(rng.random(20000), rng.integers(-160, 130, size=20000))
    for x in np.concatenate([doubles, scaled, -scaled]):
        with np.errstate(over="ignore"):
            expected = float(np.float32(x))
        assert round_to_float32(Fraction(float(x))) == expected, x


def test_ties_go_to_even_and_beyond_ties_to_nearest() -> None:
    one_ulp = Fraction(1, 2**23)  # float32 spacing in [1, 2)
    assert round_to_float32(1 + one_ulp / 2) == 1.0  # tie, 1.0 is even
    assert round_to_float32(1 + 3 * one_ulp / 2) == 1 + 2 * float(one_ulp)  # tie, 1 + 2 ulp is even
    assert round_to_float32(1 + one_ulp / 2 + Fraction(1, 2**200)) == 1 + float(one_ulp)
    assert round_to_float32(-(1 + one_ulp / 2 + Fraction(1, 2**200))) == -(1 + float(one_ulp))
    assert round_to_float32(Fraction(1, 3)) == float(np.float32(1 / 3))


def test_subnormals_overflow_and_zero() -> None:
    tiny = Fraction(1, 2**149)
    assert round_to_float32(tiny) == math.ldexp(1, -149)
    assert round_to_float32(tiny / 2) == 0.0  # tie between 0 and 2^-149: 0 is even
    assert round_to_float32(tiny / 2 + Fraction(1, 2**400)) == math.ldexp(1, -149)
    assert round_to_float32(3 * tiny / 2) == math.ldexp(2, -149)  # tie, 2 * 2^-149 is even
    assert round_to_float32(Fraction(MAX_FLOAT32)) == MAX_FLOAT32
    midpoint = Fraction(MAX_FLOAT32) + Fraction(2**104, 2)  # halfway to 2^128
    assert round_to_float32(midpoint - 1) == MAX_FLOAT32
    assert round_to_float32(midpoint) == math.inf  # tie: "2^128" is even, so overflow
    assert round_to_float32(-(2**200)) == -math.inf
    assert round_to_float32(0) == 0.0


@pytest.mark.parametrize("value", [Fraction(1, 10), Fraction(22, 7), Fraction(-7, 2**140), Fraction(10**38)])
def test_result_is_the_nearest_float32(value: Fraction) -> None:
    result = round_to_float32(value)
    below = np.nextafter(np.float32(result), np.float32(-np.inf))
    above = np.nextafter(np.float32(result), np.float32(np.inf))
    distance = abs(Fraction(result) - value)
    for neighbour in (below, above):
        if np.isfinite(neighbour):
            assert distance <= abs(Fraction(float(neighbour)) - value)


def test_interval_rounding_is_the_exact_rounding_wherever_it_decides():
    import torch

    from reprolora.numerics.exact import round_float64_interval

    rng = random.Random(5)
    exact_values, values, errors = [], [], []
    for _ in range(2000):
        mid = Fraction(_midpoint(rng))  # a float32 rounding midpoint
        offset = Fraction(rng.choice([-1, 1]) * rng.randint(1, 2**20), 2**80) * abs(mid)  # within 2^-60 of it
        x = mid + offset if rng.random() < 0.5 else Fraction(rng.uniform(-4, 4))
        value = float(x)  # x's float64 rounding
        error = abs(float(Fraction(value) - x)) * rng.choice([1.0, 2.0, 2.0**30])
        exact_values.append(x)
        values.append(value)
        errors.append(error)
    rounded, decided = round_float64_interval(torch.tensor(values, dtype=torch.float64), torch.tensor(errors))
    assert 0 < int(decided.sum()) < len(values)  # some near a midpoint are left to the exact step
    for x, r, d in zip(exact_values, rounded.tolist(), decided.tolist(), strict=True):
        if d:
            assert r == round_to_float32(x)
    exact_zero, _ = round_float64_interval(torch.tensor([-0.0, 3.0]), torch.tensor([0.0, 0.0]))
    assert [math.copysign(1, v) for v in exact_zero.tolist()] == [1, 1]


def _midpoint(rng: random.Random) -> float:
    whole = rng.randint(2**23, 2**24 - 1)
    return math.ldexp(2 * whole + 1, rng.randint(-40, 40) - 25) * rng.choice([-1, 1])
