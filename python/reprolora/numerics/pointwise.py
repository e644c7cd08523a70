"""Correctly rounded float32 exp, log and sqrt, and the compositions built from them.

Each of exp, log and sqrt returns, for every element, the float32 nearest to the exact real function of the
float32 input (ties to even; CORE-MATH's definition for exp and log, IEEE 754's for sqrt). exp and log evaluate
in float64 with single IEEE operations, each its own tensor op (range reduction by a split constant, a polynomial
in Horner form, scaling by 2^k built from bits), then prove the rounding with `exact.round_float64_interval` from
a stated error bound; the few elements that test leaves undecided are computed by mpmath and rounded by
`exact.round_to_float32`. `FALLBACKS[name]` counts the elements each op sent to the exact path.

Built on them: sigmoid and silu, written-out sequences of these ops and single IEEE float32 ops (not correctly
rounded functions); rotary_tables, the rotary embedding's cos/sin tables, each entry the correctly rounded cos or
sin of a float32 angle defined by one IEEE multiply of the position by a correctly rounded inverse frequency.

Error bounds below are in u = 2^-53, the unit roundoff of float64; gamma_n = n u / (1 - n u).
"""

from __future__ import annotations

import collections
import functools
import math
from fractions import Fraction

import torch

from reprolora.numerics.exact import round_float64_interval, round_to_float32

FALLBACKS: collections.Counter[str] = collections.Counter()  # elements each op computed exactly, for the tests

# Constants as floor(c * 2^200): exact to 2^-200, far below anything the bounds below need.
_LN2 = Fraction(0xB17217F7D1CF79ABC9E3B39803F2F6AF40F343267298B62D8A, 2**200)
_HALF_PI = Fraction(0x1921FB54442D18469898CC51701B839A252049C1114CF98E804, 2**200)


def _split(constant: Fraction, bits: int) -> tuple[float, float]:
    """constant = high + low + tiny: high has `bits` significant bits (so small integers times it are exact in
    float64), low is the float64 nearest the rest."""
    exponent = math.floor(math.log2(constant))
    quantum = Fraction(2) ** (exponent - bits + 1)
    high = float((constant // quantum) * quantum)
    return high, float(constant - Fraction(high))


_LN2_HIGH, _LN2_LOW = _split(_LN2, 44)  # |k| <= 160 in exp, |e| <= 150 in log: k * _LN2_HIGH has <= 52 bits
_INV_LN2 = float(1 / _LN2)
_EXP_COEFFICIENTS = [float(Fraction(1, math.factorial(n))) for n in range(14)]  # Taylor, degree 13
_ATANH_COEFFICIENTS = [float(Fraction(1, 2 * j + 1)) for j in range(11)]  # 2 atanh(s) = 2 s sum z^j / (2j+1)
_EXP_RELATIVE_ERROR = 2.0**-46  # proven: < 55 u < 2^-47 (exp's docstring); twice that for margin
_LOG_RELATIVE_ERROR = 2.0**-46  # proven: < 26 u < 2^-48 (log's docstring); four times that for margin


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"numerics.{name}: expects a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float64, built from its bits (exact; exponent an int64 tensor in [-1022, 1023])."""
    return ((exponent + 1023) << 52).view(torch.float64)


def _horner(coefficients: list[float], z: torch.Tensor) -> torch.Tensor:
    """sum c_n z^n by Horner's rule, each multiply and add its own IEEE op (no FMA can form)."""
    result = torch.full_like(z, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        result = result * z
        result = result + coefficient
    return result


def _mpf_fraction(value) -> Fraction:
    sign, mantissa, exponent, _ = value._mpf_
    return (-1) ** sign * Fraction(int(mantissa)) * Fraction(2) ** int(exponent)


def _round_exactly(name: str, x: float) -> float:
    """The float32 nearest mpmath's `name`(x) (exp, log, sin, cos), at rising precision until it is decided.

    mpmath evaluates elementary functions with guard bits, to within about one unit in the last place of its
    working precision; we allow 2^(16 - precision) relative, 2^16 units, and accept a result only when both ends
    of that interval round to one float32. The precision doubles from 128 bits until they do: the exact values
    here are transcendental (the callers send no exact case), so no value is a midpoint and the loop ends. The
    hardest float32 cases lie about 2^-(24 + 40) from a midpoint, well within 128 bits.
    """
    import mpmath  # lazy: torch brings it (through sympy); only the rare fallback needs it

    return _round_mpmath(lambda: getattr(mpmath, name)(mpmath.mpf(x)), f"{name}({x!r})")


_ROUND_MPMATH_LIMIT = 8192  # bits: where the precision doubling of the mpmath fallbacks gives up


def _round_mpmath(evaluate, what: str) -> float:
    """The float32 nearest a real number mpmath computes by `evaluate()` at the current working precision, to
    within 2^16 units in its last place (as _round_exactly allows), doubling the precision from 128 bits until
    both ends of that interval round to one float32; ArithmeticError past 8192 bits (only an exact midpoint
    would get there)."""
    import mpmath  # lazy, as in _round_exactly

    precision = 128
    while precision <= _ROUND_MPMATH_LIMIT:
        with mpmath.workprec(precision):
            value = _mpf_fraction(evaluate())
        slack = abs(value) / 2 ** (precision - 16)
        low, high = round_to_float32(value - slack), round_to_float32(value + slack)
        if low == high:
            return low
        precision *= 2
    raise ArithmeticError(f"numerics.{what}: rounding not decided at {_ROUND_MPMATH_LIMIT} bits")


def _fill_undecided(x: torch.Tensor, rounded: torch.Tensor, undecided: torch.Tensor, name: str) -> torch.Tensor:
    count = int(undecided.sum())
    if count == 0:
        return rounded
    FALLBACKS[name] += count
    rounded = rounded.clone()
    inputs = x[undecided].tolist()
    rounded[undecided] = torch.tensor([_round_exactly(name, value) for value in inputs], dtype=torch.float32)
    return rounded


@torch.no_grad()
def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x correctly rounded to float32 for each element of the float32 tensor x (ties to even).

    Specials: exp(NaN) = NaN, exp(+inf) = +inf, exp(-inf) = +0; overflow (x >= 88.7228...) gives +inf and
    underflow goes through the float32 subnormals to +0, as the rounding of the exact value says; exp(+-0) = 1.

    Route (float64, each step one IEEE op): x is clamped to [-110, 100] (outside it e^x rounds to +0 or +inf and
    so does the clamped value's); k = round(x / ln2); r = (x - k*L1) - k*L2 with ln2 = L1 + L2 + t, L1 of 44 bits,
    |t| < 2^-97; e^r by its Taylor polynomial of degree 13 in Horner form; times 2^k built from bits.
    Error, relative to e^x: x - k*L1 is exact (k*L1 has <= 52 bits; for k != 0 both are multiples of 2^-44 and
    their difference is below 1); r is then x - k ln2 + d with |d| <= u|r| + 2^-88, |r| <= 0.347, costing
    e^|d| - 1 < 0.35 u + 2^-88. Taylor's remainder is below 2^-56 e^r; rounding the coefficients costs u e^|r|
    and Horner's rule gamma_26 e^|r| (Higham, 5.3), so relative to e^r <= e^(2|r|) (1.001 u + gamma_26) < 54.1 u.
    The product by 2^k is exact (every result lies in float64's normal range). In all < 55 u < 2^-47.
    """
    _check(x, "exp")
    x64 = x.to(torch.float64)
    nan = torch.isnan(x64)
    clamped = torch.where(nan, torch.zeros_like(x64), x64).clamp(-110.0, 100.0)
    k = torch.round(clamped * _INV_LN2)
    reduced = clamped - k * _LN2_HIGH
    reduced = reduced - k * _LN2_LOW
    value = _horner(_EXP_COEFFICIENTS, reduced) * _power_of_two(k.to(torch.int64))
    rounded, decided = round_float64_interval(value, value * _EXP_RELATIVE_ERROR)
    rounded = torch.where(nan, x, rounded)
    return _fill_undecided(x, rounded, ~decided & ~nan, "exp")


@torch.no_grad()
def log(x: torch.Tensor) -> torch.Tensor:
    """The natural logarithm correctly rounded to float32 for each element of the float32 tensor x (ties to even).

    Specials: log(NaN) = NaN, log(x < 0) = NaN, log(+-0) = -inf, log(+inf) = +inf, log(1) = +0. Subnormal inputs
    are exact float32 values like any other (log of the smallest, 2^-149, is about -103.28).

    Route (float64, each step one IEEE op): x = m 2^e with m in [sqrt(1/2), sqrt(2)] (exponent from the bits,
    subnormals first scaled by 2^24, m by a power of two built from bits: all exact); f = m - 1 (exact,
    Sterbenz); s = f / (2 + f) (2 + f exact: a multiple of 2^-24 below 4); log m = 2 atanh s = 2 s q(s^2),
    q(z) = sum_{j<=10} z^j / (2j+1) in Horner form; log x = e*L1 + (log m + e*L2) with ln2 = L1 + L2 + t.
    Error: s carries one rounding, z = s*s three; |s| <= 0.1716, z <= 0.0295; q's truncation is below 2^-60,
    its coefficients cost u, Horner's rule gamma_20 (Higham, 5.3; every term is positive), z's error 0.03 u;
    the product 2s * q one more: log m within 23.2 u of its value. e*L1 is exact (|e| <= 150); the two adds and
    e*L2 cost u(|log m| + |log x|) + 2^-88. Since |log m| <= |log x| (equal when e = 0; when e != 0,
    |log x| >= ln2 - 0.347 >= |log m|), and |log x| >= 0.346 whenever the additive 2^-88 is present, the total
    is < 26 u |log x| < 2^-48 relative. log(1) is computed as exactly 0 (f = 0), the one exact case.
    """
    _check(x, "log")
    x64 = x.to(torch.float64)
    positive = (x64 > 0) & torch.isfinite(x64)
    safe = torch.where(positive, x, torch.ones_like(x))
    subnormal = safe < 2.0**-126
    safe = torch.where(subnormal, safe * 2.0**24, safe)  # exact: a subnormal times 2^24 is a normal float32
    exponent = ((safe.view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 127
    mantissa = safe.to(torch.float64) * _power_of_two(-exponent)  # in [1, 2)
    large = mantissa > 1.4142135623730951
    mantissa = torch.where(large, mantissa * 0.5, mantissa)
    exponent = exponent + large.to(torch.int64) - subnormal.to(torch.int64) * 24
    f = mantissa - 1.0
    s = f / (f + 2.0)
    z = s * s
    log_m = (s * 2.0) * _horner(_ATANH_COEFFICIENTS, z)
    e = exponent.to(torch.float64)
    tail = log_m + e * _LN2_LOW
    value = e * _LN2_HIGH + tail
    rounded, decided = round_float64_interval(value, value.abs() * _LOG_RELATIVE_ERROR)
    special = torch.where(
        torch.isnan(x64) | (x64 < 0),
        torch.full_like(x, math.nan),
        torch.where(x64 == 0, torch.full_like(x, -math.inf), x),  # the rest of the specials: +inf
    )
    rounded = torch.where(positive, rounded, special)
    return _fill_undecided(x, rounded, ~decided & positive, "log")


def _neighbours(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 values just below and just above each positive finite float32 c, from its bits."""
    bits = c.view(torch.int32)
    return (bits - 1).view(torch.float32), (bits + 1).view(torch.float32)


@torch.no_grad()
def sqrt(x: torch.Tensor) -> torch.Tensor:
    """The square root correctly rounded to float32 for each element of the float32 tensor x (IEEE 754's sqrt).

    Specials: sqrt(NaN) = NaN, sqrt(x < 0) = NaN, sqrt(+-0) = +-0, sqrt(+inf) = +inf.

    Route: a candidate c (torch's float64 sqrt rounded to float32: any candidate within a few ulps will do), then
    corrections until c is proven: with c- and c+ the float32 neighbours of c, the midpoints (c- + c)/2 and
    (c + c+)/2 are exact in float64 (25 significant bits) and so are their squares (50 bits; the squares lie
    between 2^-150 and 2^129, inside float64's normal range). c is sqrt(x)'s rounding exactly when
    lower^2 < x < upper^2; x never equals such a square (the square of a 25-bit odd significand has more than 24
    bits), so no ties arise. Where x <= lower^2, c steps down; where x >= upper^2, up; repeated until every
    element holds, so the result depends on these comparisons alone, not on the candidate's bits.
    """
    _check(x, "sqrt")
    x64 = x.to(torch.float64)
    positive = (x64 > 0) & torch.isfinite(x64)
    safe64 = torch.where(positive, x64, torch.ones_like(x64))
    candidate = torch.sqrt(safe64).to(torch.float32)
    for _ in range(64):
        below, above = _neighbours(candidate)
        c64 = candidate.to(torch.float64)
        lower = (below.to(torch.float64) + c64) * 0.5
        upper = (c64 + above.to(torch.float64)) * 0.5
        step_down = safe64 <= lower * lower
        step_up = safe64 >= upper * upper
        if not bool((step_down | step_up).any()):
            break
        candidate = torch.where(step_down, below, torch.where(step_up, above, candidate))
    else:
        raise ArithmeticError("numerics.sqrt: correction did not settle")
    special = torch.where((x64 < 0) | torch.isnan(x64), torch.full_like(x, math.nan), x)  # +-0 and +inf stay
    return torch.where(positive, candidate, special)


@torch.no_grad()
def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The logistic function as the written-out float32 sequence 1 / (1 + exp(-x)), for the float32 tensor x.

    Definition: e = exp(-x) correctly rounded to float32 (this module's exp; the negation is exact), then
    d = 1 + e as one IEEE float32 addition, then 1 / d as one IEEE float32 division, each rounded to nearest even
    in its own tensor op. This is a fixed sequence of three correctly rounded operations, not the correctly
    rounded sigmoid: the result is within about 1.5 ulp of 1 / (1 + e^-x) (each step's relative error is at most
    2^-24, the division's condition number is below 1), and its bits depend on x alone.

    Specials and edges: sigmoid(NaN) = NaN; sigmoid(+inf) = 1 (e = +0); sigmoid(-inf) = +0 (e = +inf, 1/inf);
    sigmoid(+-0) = 0.5. For x > 17.33 or so, e < 2^-25 and 1 + e rounds to 1, so the result is exactly 1.0; for
    x < -88.72 (e^-x overflows to +inf) it is +0; in between, for x below about -87.3, it is a float32 subnormal,
    the IEEE division's rounding of 1 / d on the subnormal grid.
    """
    _check(x, "sigmoid")
    e = exp(-x)
    return 1.0 / (e + 1.0)


@torch.no_grad()
def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU as the written-out float32 sequence x * sigmoid(x): this module's sigmoid, then one IEEE float32
    multiply (rounded to nearest even). Not the correctly rounded x / (1 + e^-x); its bits depend on x alone.

    Specials: silu(NaN) = NaN; silu(+inf) = +inf; silu(-inf) = NaN, IEEE's -inf * 0 (the sequence as written;
    the models never see infinite activations); silu(+-0) = +-0. For x < -88.72, sigmoid(x) = +0 and the product
    is -0; for large positive x, sigmoid(x) = 1 and the result is x exactly.
    """
    _check(x, "silu")
    return x * sigmoid(x)


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """inv_freq_i = the float32 nearest the exact base^(-2i/head_dim), i < head_dim/2 (mpmath, precision doubling)."""
    import mpmath

    def power(i: int):
        return lambda: mpmath.power(mpmath.mpf(base), mpmath.mpf(-2 * i) / head_dim)

    values = [_round_mpmath(power(i), f"rotary_tables: {base!r}^(-{2 * i}/{head_dim})") for i in range(head_dim // 2)]
    return torch.tensor(values, dtype=torch.float32)


# pi/2 = P1 + P2 + P3 + t: P1 of 28 bits (a multiple of 2^-27), P2 the next 28 (a multiple of 2^-55), P3 the float64
# nearest the rest, |t| < 2^-109. Any k < 2^24 times P1 or P2 has at most 52 bits: exact in float64.
_P1 = float((_HALF_PI * 2**27) // 1 / 2**27)
_P2 = float(((_HALF_PI - Fraction(_P1)) * 2**55) // 1 / 2**55)
_P3 = float(_HALF_PI - Fraction(_P1) - Fraction(_P2))
_TWO_OVER_PI = float(1 / _HALF_PI)
_SIN_COEFFICIENTS = [float(Fraction((-1) ** j, math.factorial(2 * j + 1))) for j in range(9)]  # sin r = r S(r^2)
_COS_COEFFICIENTS = [float(Fraction((-1) ** j, math.factorial(2 * j))) for j in range(10)]  # cos r = C(r^2)
_TRIG_RELATIVE_ERROR = 2.0**-44  # proven: < 37 u < 2^-47.7 (_sin_cos's docstring); 2^3.7 times that for margin


@functools.lru_cache(maxsize=1 << 16)
def _round_trig(name: str, angle: float) -> float:
    return _round_exactly(name, angle)


def _sin_cos(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos, each correctly rounded to float32, of every element of a float32 tensor of angles in
    [0, 2^24) (exact reals), ties impossible (sin a, cos a are transcendental for rational a != 0; a = 0 gives
    exactly sin = +0, cos = 1).

    Route (float64, each step one IEEE op): k = round(a * 2/pi) (k < 2^24, and |a - k pi/2| <= pi/4 + 2^-27, as
    a * 2/pi is within 2^-28 of its value); r1 = a - k*P1 is exact: k*P1 has <= 52 bits, and for k >= 1,
    a >= 0.78 is a multiple of 2^-24, so r1 is a multiple of 2^-27 with |r1| <= 0.786 + k (pi/2 - P1)
    < 0.786 + 2^24 2^-27 < 1; r2 = r1 - k*P2 (k*P2 exact, the subtraction rounded: <= u |r2|); r = r2 - k*P3
    (the product's rounding < u 2^24 2^-55 = 2^-84, the subtraction's <= u|r|); the tail k t < 2^-85. So the
    computed r is within d = 4u|r| + 2^-80 of a - k pi/2 (generously); d = 0 when k = 0, where every step is
    exact and r = a (so tiny and subnormal angles are decided on their relative bound alone). Since sin and cos
    are 1-Lipschitz, the reduction costs at most d
    absolutely. Then sin r = r S(r^2), cos r = C(r^2), their Taylor polynomials in Horner form (S to z^8, C to
    z^9), on |r| <= 0.786: truncation < 2^-62 relative; z = r*r costs u relative, moving S by < 0.13u and C by
    < 0.5u relative; the coefficients' rounding u and Horner's rule gamma_16 (S) / gamma_18 (C) (Higham, 5.3),
    both relative to sum |c_j| z^j, which is at most 1.23 S(z) (sinh r / sin r) and 1.88 C(z) (cosh r / cos r);
    the product r*S one more u. In all below 23u (sin) and 37u (cos) relative: 2^-47.7. The quadrant k mod 4
    picks +-sin r or +-cos r (negation exact). Each result goes through round_float64_interval with error
    d + 2^-44 |value|; what it leaves undecided is computed by mpmath (_round_exactly) and counted in
    FALLBACKS["sin"], FALLBACKS["cos"].
    """
    a = angle.to(torch.float64)
    k = torch.round(a * _TWO_OVER_PI)
    r = a - k * _P1
    r = r - k * _P2
    r = r - k * _P3
    z = r * r
    sin_r = r * _horner(_SIN_COEFFICIENTS, z)
    cos_r = _horner(_COS_COEFFICIENTS, z)
    quadrant = k.to(torch.int64) & 3
    sin_a = torch.where(
        quadrant == 0, sin_r, torch.where(quadrant == 1, cos_r, torch.where(quadrant == 2, -sin_r, -cos_r))
    )
    cos_a = torch.where(
        quadrant == 0, cos_r, torch.where(quadrant == 1, -sin_r, torch.where(quadrant == 2, -cos_r, sin_r))
    )
    reduction = torch.where(k == 0, torch.zeros_like(r), r.abs() * (4 * 2.0**-53) + 2.0**-80)  # k = 0: r = a exactly
    zero = a == 0
    results = []
    for name, value in (("sin", sin_a), ("cos", cos_a)):
        rounded, decided = round_float64_interval(value, reduction + value.abs() * _TRIG_RELATIVE_ERROR)
        rounded = torch.where(zero, torch.full_like(rounded, 0.0 if name == "sin" else 1.0), rounded)
        undecided = ~decided & ~zero
        count = int(undecided.sum())
        if count:
            FALLBACKS[name] += count
            rounded = rounded.clone()
            inputs = angle[undecided].tolist()
            rounded[undecided] = torch.tensor([_round_trig(name, v) for v in inputs], dtype=torch.float32)
        results.append(rounded)
    return results[0], results[1]


@torch.no_grad()
def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's (cos, sin) tables, float32 [len(positions), head_dim], in Hugging Face's rotate_half
    layout: column j and column j + head_dim/2 both hold frequency j (emb = cat([freqs, freqs], -1)).

    Definition, for position p (an int64 in [0, 2^24): exact in float32) and i < head_dim/2:
    - inv_freq_i = the float32 nearest the exact real base^(-2i/head_dim) (mpmath, precision doubled until the
      rounding is decided; cached per (head_dim, base)); inv_freq_0 = 1.
    - angle = p * inv_freq_i as ONE IEEE float32 multiply (rounded to nearest even); angle < 2^24.
    - cos, sin = the float32 nearest the exact cos and sin of that float32 angle, an exact real (_sin_cos: a
      float64 route behind round_float64_interval with a proven bound, mpmath for what it leaves undecided).
    HF computes inv_freq as 1 / float32(base ** (2i/head_dim)) and cos/sin by the platform's libm, so its tables
    agree with these to a few float32 ulps of the angle (more for large positions, where an inv_freq one ulp
    apart moves the angle by p ulps).

    Raises ValueError for a head_dim that is not positive and even, a base that is not finite and > 0, or a
    position outside [0, 2^24); TypeError for positions that are not a 1-D integer tensor. Position 0 gives
    cos = 1, sin = +0 exactly.
    """
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype.is_floating_point:
        raise TypeError("numerics.rotary_tables: positions must be a 1-D integer tensor")
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"numerics.rotary_tables: head_dim must be a positive even integer, got {head_dim!r}")
    base = float(base)
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"numerics.rotary_tables: base must be finite and positive, got {base!r}")
    positions = positions.to(torch.int64)
    if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= 2**24):
        raise ValueError("numerics.rotary_tables: positions must lie in [0, 2^24), where float32 holds them exactly")
    inv_freq = _inverse_frequencies(head_dim, base)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # one IEEE float32 multiply each
    sin, cos = _sin_cos(angles)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
