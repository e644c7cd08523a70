"""Find float32 inputs whose exp/log lies within 2^-40 (relative) of a float32 rounding midpoint.

    PYTHONPATH=python python python/benchmarks/numerics_hard_cases.py exp 0.5 4
    PYTHONPATH=python python python/benchmarks/numerics_hard_cases.py log 1 2

scans every float32 in [low, high) (and [-high, -low) for exp), keeps those whose float64 fast value the rounding
test leaves undecided at a 2^-40 bound, confirms each with mpmath at 256 bits and prints it with its distance to
the midpoint in units of the result's value. tests/test_numerics_pointwise.py holds a list found this way.
"""

from __future__ import annotations

import sys
from fractions import Fraction

import mpmath
import torch

from reprolora.numerics import pointwise
from reprolora.numerics.exact import midpoint_distance as exact_midpoint_distance
from reprolora.numerics.exact import round_float64_interval


def float64_value(name: str, x: torch.Tensor) -> torch.Tensor:
    """The fast path's float64 value, before its rounding test (the ops of pointwise.exp / pointwise.log)."""
    x64 = x.to(torch.float64)
    if name == "exp":
        k = torch.round(x64 * pointwise._INV_LN2)
        reduced = (x64 - k * pointwise._LN2_HIGH) - k * pointwise._LN2_LOW
        return pointwise._horner(pointwise._EXP_COEFFICIENTS, reduced) * pointwise._power_of_two(k.to(torch.int64))
    exponent = ((x.view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 127
    mantissa = x64 * pointwise._power_of_two(-exponent)
    large = mantissa > 1.4142135623730951
    mantissa = torch.where(large, mantissa * 0.5, mantissa)
    e = (exponent + large.to(torch.int64)).to(torch.float64)
    f = mantissa - 1.0
    s = f / (f + 2.0)
    log_m = (s * 2.0) * pointwise._horner(pointwise._ATANH_COEFFICIENTS, s * s)
    return e * pointwise._LN2_HIGH + (log_m + e * pointwise._LN2_LOW)


def midpoint_distance(name: str, x: float) -> float:
    """|f(x) - nearest float32 midpoint| / |f(x)|, from mpmath at 256 bits."""
    with mpmath.workprec(256):
        value = getattr(mpmath, name)(mpmath.mpf(x))
        exact = Fraction(int(value.man)) * Fraction(2) ** int(value.exp) * (1 if value >= 0 else -1)
    return exact_midpoint_distance(exact)


def main() -> None:
    name, low, high = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    first = torch.tensor([low], dtype=torch.float32).view(torch.int32).item()
    last = torch.tensor([high], dtype=torch.float32).view(torch.int32).item()
    signs = (1, -1) if name == "exp" else (1,)
    for start in range(first, last, 1 << 22):
        bits = torch.arange(start, min(start + (1 << 22), last), dtype=torch.int32)
        for sign in signs:
            x = bits.view(torch.float32) * sign
            value = float64_value(name, x)
            _, decided = round_float64_interval(value, value.abs() * 2.0**-40)
            for candidate in x[~decided].tolist():
                distance = midpoint_distance(name, candidate)
                if distance < 2.0**-38:
                    print(f"{name} {candidate.hex()} {distance:.3e}", flush=True)


if __name__ == "__main__":
    main()
