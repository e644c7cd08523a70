"""numerics.pointwise against mpmath at 400 bits rounded by exact.round_to_float32 (exp, log, and the rotary
tables' sin and cos), against exact integer square roots and numpy's IEEE float32 sqrt (sqrt), against the
written-out sequence in exact arithmetic and in numpy's IEEE float32 (sigmoid, silu), and against transformers'
LlamaRotaryEmbedding (rotary_tables); on random inputs, specials, and inputs whose results lie within about 2^-46
of a float32 rounding midpoint (so the exact fallback runs).

The hard inputs were found by `PYTHONPATH=python python python/benchmarks/numerics_hard_cases.py exp 0.5 8` and
`... log 0.5 4` (every float32 in those ranges; the script confirms each with mpmath); the test checks again
that each lies within 2^-44 of a midpoint, so the list cannot silently hold easy cases.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch

from reprolora.numerics import pointwise
from reprolora.numerics.exact import midpoint_distance, round_to_float32

HARD_EXP = [  # input, then its result's distance to a midpoint relative to the result
    "0x1.62b6660000000p+1",  # 6.359e-16
    "0x1.0364920000000p+1",  # 7.449e-16
    "0x1.cce3320000000p+0",  # 1.429e-15
    "-0x1.f02a660000000p+1",  # 1.821e-15
    "0x1.bae1960000000p+2",  # 1.950e-15
    "-0x1.7f42960000000p+0",  # 2.110e-15
    "0x1.69a0560000000p+1",  # 2.983e-15
    "-0x1.edfb240000000p-1",  # 3.005e-15
    "-0x1.03d5be0000000p+0",  # 3.018e-15
    "-0x1.705ce40000000p+1",  # 3.045e-15
    "0x1.b784980000000p-1",  # 3.464e-15
    "-0x1.66b3960000000p+1",  # 5.085e-15
]
HARD_LOG = [
    "0x1.a6c9ae0000000p+0",  # 1.207e-15
    "0x1.8aa6f20000000p+0",  # 1.474e-15
    "0x1.addc8a0000000p+1",  # 1.677e-15
    "0x1.a099640000000p+1",  # 2.063e-15
    "0x1.b88ea00000000p+0",  # 3.137e-15
    "0x1.9b84a00000000p+1",  # 3.852e-15
    "0x1.4cd8160000000p+0",  # 4.511e-15
    "0x1.fffffc0000000p-1",  # 4.737e-15
    "0x1.5cb51e0000000p+1",  # 9.827e-15
    "0x1.aa9a700000000p-1",  # 1.082e-14
    "0x1.5e49de0000000p-1",  # 1.089e-14
    "0x1.95ee500000000p+0",  # 1.149e-14
]


def exact_value(name: str, x: float, precision: int = 400) -> Fraction:
    with mpmath.workprec(precision):
        return pointwise._mpf_fraction(getattr(mpmath, name)(mpmath.mpf(x)))


def oracle(name: str, x: float) -> float:
    """The float32 nearest name(x): mpmath at 400 bits, +-2^-380 relative decides every float32 case.

    For exp, an x outside [-110, 100] is answered from the end it passes: e^-110 already rounds to +0 and e^100
    to +inf, and e^x is monotone, so every x beyond rounds the same (asserted here). This keeps mpmath and
    round_to_float32 off values like e^(10^38), whose exact Fraction would not fit in memory.
    """
    if name == "exp" and not -110.0 <= x <= 100.0:
        end = -110.0 if x < 0 else 100.0
        rounded = oracle(name, end)
        assert rounded == (0.0 if x < 0 else math.inf), (x, rounded)
        return rounded
    value = exact_value(name, x)
    slack = abs(value) / 2**380
    low, high = round_to_float32(value - slack), round_to_float32(value + slack)
    assert low == high, (name, x)
    return low


def random_floats(count: int, seed: int) -> torch.Tensor:
    """float32 values from uniformly random bits (every binade, subnormals included), finite ones only."""
    bits = np.random.default_rng(seed).integers(-(2**31), 2**31, size=count, dtype=np.int64).astype(np.int32)
    x = torch.from_numpy(bits).view(torch.float32)
    return x[torch.isfinite(x)]


def assert_matches_oracle(name: str, x: torch.Tensor) -> None:
    result = getattr(pointwise, name)(x)
    assert result.dtype == torch.float32 and result.shape == x.shape
    for value, got in zip(x.tolist(), result.tolist(), strict=True):
        assert got == oracle(name, value), (name, value.hex(), got)


@pytest.mark.parametrize("name", ["exp", "log"])
def test_random_inputs_match_mpmath(name: str) -> None:
    """Random bit patterns over the op's whole domain (every binade, subnormals included), plus for exp uniform
    values over [-105, 90] and random bit patterns kept where e^x is finite and non-zero (|x| < 104), so most of
    exp's inputs land where its result is neither 0 nor inf."""
    generator = torch.Generator().manual_seed(1)
    bits = random_floats(1000, 2)
    if name == "exp":
        spread = (torch.rand(500, generator=generator, dtype=torch.float64) * 195 - 105).to(torch.float32)
        finite = random_floats(1500, 6)
        x = torch.cat([spread, bits[:300], finite[finite.abs() < 104][:500]])
    else:
        x = bits.abs()
        x = x[x > 0]
    assert_matches_oracle(name, x)


@pytest.mark.parametrize("name,hard", [("exp", HARD_EXP), ("log", HARD_LOG)])
def test_hard_cases_take_the_fallback_and_are_right(name: str, hard: list[str]) -> None:
    x = torch.tensor([float.fromhex(h) for h in hard], dtype=torch.float32)
    assert len(hard) >= 5
    for value in x.tolist():
        assert midpoint_distance(exact_value(name, value)) < 2.0**-44, value.hex()
    before = pointwise.FALLBACKS[name]
    assert_matches_oracle(name, x)
    assert pointwise.FALLBACKS[name] - before >= len(hard) // 2  # at a 2^-46 bound most of these are undecided


def test_exp_specials_overflow_and_subnormals() -> None:
    tiny = math.ldexp(1, -149)
    x = torch.tensor(
        [
            0.0,
            -0.0,
            math.inf,
            -math.inf,
            math.nan,
            88.72283,
            88.72284,
            89.0,
            -87.5,
            -100.0,  # e^-100 = 3.7e-44: a subnormal, 26.55 * 2^-149, rounds to 27 * 2^-149
            -103.0,  # e^-103 = 1.40 * 2^-149: rounds to the smallest subnormal
            -103.97,  # e^-103.97 = 1.002 * 2^-150: just above half the smallest subnormal, rounds up to it
            -103.98,  # e^-103.98 = 0.992 * 2^-150: just below half the smallest subnormal, rounds to +0
            -104.0,
            -120.0,
            tiny,
            -tiny,
        ],
        dtype=torch.float32,
    )
    result = pointwise.exp(x).tolist()
    assert result[:4] == [1.0, 1.0, math.inf, 0.0] and math.isnan(result[4])
    assert result[5] < math.inf and result[6] == math.inf and result[7] == math.inf
    for value, got in zip(x.tolist()[8:], result[8:], strict=True):
        assert got == oracle("exp", value), value  # subnormal results, underflow to zero, exp(+-2^-149) = 1
    assert 0 < result[9] < 2.0**-126 and result[9] == 27 * tiny
    assert result[10] == tiny and result[11] == tiny
    assert result[12:15] == [0.0, 0.0, 0.0] and result[15:] == [1.0, 1.0]


def test_log_specials() -> None:
    x = torch.tensor(
        [1.0, 0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, math.ldexp(1, -149), 3.4e38], dtype=torch.float32
    )
    result = pointwise.log(x).tolist()
    assert result[0] == 0.0 and math.copysign(1, result[0]) == 1.0
    assert result[1:3] == [-math.inf, -math.inf] and math.isnan(result[3]) and result[4] == math.inf
    assert math.isnan(result[5]) and math.isnan(result[6])
    assert result[7] == oracle("log", math.ldexp(1, -149)) and result[8] == oracle("log", x[8].item())


def exact_sqrt_rounding(x: float) -> float:
    """sqrt(x) rounded to float32 from Python's integer square root: floor(sqrt(x) 2^k) brackets it exactly."""
    value = Fraction(x)
    k = 200
    scaled = value * 2 ** (2 * k)
    root = math.isqrt(scaled.numerator // scaled.denominator)
    if root * root == scaled and scaled.denominator == 1:
        return round_to_float32(Fraction(root, 2**k))
    low, high = round_to_float32(Fraction(root, 2**k)), round_to_float32(Fraction(root + 1, 2**k))
    assert low == high
    return low


def test_sqrt_matches_exact_and_ieee() -> None:
    x = random_floats(200000, 3).abs()
    result = pointwise.sqrt(x)
    ieee = torch.from_numpy(np.sqrt(x.numpy()))  # numpy's float32 sqrt: the hardware's IEEE instruction
    assert torch.equal(result.view(torch.int32), ieee.view(torch.int32))
    for value, got in zip(x[:2000].tolist(), result[:2000].tolist(), strict=True):
        if value > 0:
            assert got == exact_sqrt_rounding(value), value
    specials = torch.tensor([0.0, -0.0, -1.0, math.inf, math.nan, 4.0, math.ldexp(1, -149)], dtype=torch.float32)
    out = pointwise.sqrt(specials).tolist()
    assert out[0] == 0.0 and math.copysign(1, out[1]) == -1.0 and math.isnan(out[2]) and out[3] == math.inf
    assert math.isnan(out[4]) and out[5] == 2.0 and out[6] == exact_sqrt_rounding(math.ldexp(1, -149))


@pytest.mark.parametrize("factor", [1 + 2.0**-21, 1 - 3 * 2.0**-23, 1 + 2.0**-30])
def test_sqrt_corrects_a_wrong_candidate(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """Candidates a few ulps off (sqrt's docstring: any candidate within a few ulps) are corrected to the same bits;
    one-ulp steps are not meant to travel further (the loop raises after 64)."""
    x = random_floats(5000, 4).abs()
    expected = pointwise.sqrt(x)
    true_sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda t: true_sqrt(t) * factor)
    assert torch.equal(pointwise.sqrt(x).view(torch.int32), expected.view(torch.int32))
    assert torch.equal(expected.view(torch.int32), torch.from_numpy(np.sqrt(x.numpy())).view(torch.int32))


@pytest.mark.parametrize("name", ["exp", "log", "sqrt", "sigmoid", "silu"])
def test_same_bits_at_one_and_two_threads(name: str) -> None:
    x = torch.randn(300000, generator=torch.Generator().manual_seed(5)) * 20
    if name in ("log", "sqrt"):
        x = x.abs()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = getattr(pointwise, name)(x)
        torch.set_num_threads(2)
        two = getattr(pointwise, name)(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))


def test_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError, match="numerics.exp: expects a float32 tensor"):
        pointwise.exp(torch.zeros(3, dtype=torch.float64))


def sigmoid_steps(x: float) -> float:
    """The written-out sigmoid from exact arithmetic: exp(-x) by the oracle, then 1 + e and 1 / d each rounded."""
    e = oracle("exp", -x)
    if math.isnan(e):
        return math.nan
    d = math.inf if e == math.inf else round_to_float32(Fraction(e) + 1)
    return 0.0 if d == math.inf else round_to_float32(1 / Fraction(d))


def test_sigmoid_and_silu_are_the_written_out_sequence() -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.cat(
        [
            torch.randn(300, generator=generator) * 12,
            torch.rand(100, generator=generator) * 200 - 100,  # the ends: 1.0, subnormals, +0
            random_floats(300, 8),
        ]
    )
    got = pointwise.sigmoid(x)
    for value, result in zip(x.tolist(), got.tolist(), strict=True):
        assert result == sigmoid_steps(value), value.hex()
        true = 1 / (1 + mpmath.exp(-mpmath.mpf(value)))
        if result >= 2.0**-126:  # a few roundings from the true sigmoid (not correctly rounded, by definition)
            assert abs(result - true) <= 2.0**-22 * true, value.hex()
    # The same bits as numpy's IEEE float32 add and divide after exp, on many inputs.
    many = torch.randn(100000, generator=generator) * 30
    e = pointwise.exp(-many).numpy()
    expected = np.float32(1) / (e + np.float32(1))
    assert np.array_equal(pointwise.sigmoid(many).numpy().view(np.int32), expected.view(np.int32))
    silu = pointwise.silu(many).numpy()
    assert np.array_equal(silu.view(np.int32), (many.numpy() * expected).view(np.int32))


def test_sigmoid_and_silu_specials() -> None:
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 17.5, 40.0, -88.0, -88.8, -200.0], dtype=torch.float32)
    sig = pointwise.sigmoid(x).tolist()
    assert sig[:4] == [0.5, 0.5, 1.0, 0.0] and math.isnan(sig[4])
    assert sig[5] == 1.0 and sig[6] == 1.0 and 0 < sig[7] < 2.0**-126 and sig[8] == 0.0 and sig[9] == 0.0
    assert sig[7] == sigmoid_steps(-88.0)
    out = pointwise.silu(x).tolist()
    assert out[0] == 0.0 and math.copysign(1, out[1]) == -1.0 and out[2] == math.inf
    assert math.isnan(out[3]) and math.isnan(out[4])  # -inf * 0 as IEEE says; NaN stays NaN
    assert out[5] == 17.5 and out[6] == 40.0 and out[8] == 0.0 and math.copysign(1, out[9]) == -1.0
    with pytest.raises(TypeError, match="numerics.sigmoid"):
        pointwise.sigmoid(torch.zeros(2, dtype=torch.float64))


HARD_SIN = [  # float32 angles whose sine lies within ~2^-46 of a float32 midpoint (found by scanning [1, 2) and
    "0x1.41f49c0000000p+0",  # [1024, 2048) with numpy's float64 sin, confirmed by mpmath)
    "0x1.89093e0000000p+10",
    "0x1.0d67a40000000p+0",
    "0x1.32f9920000000p+10",
    "0x1.1e07f20000000p+10",
    "0x1.d38c8a0000000p+0",
]
HARD_COS = [
    "0x1.544ce40000000p+0",
    "0x1.0c4d4a0000000p+0",
    "0x1.b6781c0000000p+0",
    "0x1.2561d80000000p+0",
    "0x1.ec92880000000p+10",
    "0x1.4432b20000000p+0",
]
NEAR_MULTIPLES_OF_PI = [3, 22, 333, 355, 103993, 104348, 208341, 312689, 833719, 1146408, 4272943, 5419351]


def test_sin_cos_match_mpmath_and_take_the_fallback_on_hard_cases() -> None:
    generator = torch.Generator().manual_seed(9)
    bits = random_floats(600, 10).abs()
    angles = torch.cat(
        [
            torch.rand(300, generator=generator) * 7,
            torch.rand(200, generator=generator) * 2.0**24,
            bits[bits < 2.0**24][:200],  # random bit patterns: every binade below 2^24, subnormals included
            torch.tensor(NEAR_MULTIPLES_OF_PI, dtype=torch.float32),
            torch.tensor([1e-6, 2.0**-20, 0.7853982, 0.7853981, 2.0**24 - 1]),
        ]
    )
    before = pointwise.FALLBACKS["sin"] + pointwise.FALLBACKS["cos"]
    sin, cos = pointwise._sin_cos(angles)
    assert pointwise.FALLBACKS["sin"] + pointwise.FALLBACKS["cos"] - before <= 3  # the fast path decides nearly all
    for value, s, c in zip(angles.tolist(), sin.tolist(), cos.tolist(), strict=True):
        assert s == oracle("sin", value) and c == oracle("cos", value), value.hex()
    for name, hard in (("sin", HARD_SIN), ("cos", HARD_COS)):
        x = torch.tensor([float.fromhex(h) for h in hard], dtype=torch.float32)
        for value in x.tolist():
            assert midpoint_distance(exact_value(name, value)) < 2.0**-44, value.hex()
        pointwise._round_trig.cache_clear()
        before = pointwise.FALLBACKS[name]
        result = pointwise._sin_cos(x)[0 if name == "sin" else 1]
        assert result.tolist() == [oracle(name, value) for value in x.tolist()]
        assert pointwise.FALLBACKS[name] - before >= len(hard) // 2
    zero = pointwise._sin_cos(torch.zeros(1))
    assert zero[0].tolist() == [0.0] and math.copysign(1, zero[0].item()) == 1.0 and zero[1].tolist() == [1.0]


@pytest.mark.parametrize("head_dim,base", [(64, 10000.0), (128, 1000000.0)])
def test_rotary_tables_definition(head_dim: int, base: float) -> None:
    positions = torch.tensor([0, 1, 2, 7, 100, 511, 4095, 65537, 2**24 - 1])
    cos, sin = pointwise.rotary_tables(positions, head_dim, base)
    half = head_dim // 2
    assert cos.shape == sin.shape == (len(positions), head_dim) and cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    inv_freq = pointwise._inverse_frequencies(head_dim, base)
    for i, f in enumerate(inv_freq.tolist()):
        with mpmath.workprec(400):
            exact = pointwise._mpf_fraction(mpmath.power(mpmath.mpf(base), mpmath.mpf(-2 * i) / head_dim))
        assert f == round_to_float32(exact), i
    assert inv_freq[0] == 1.0
    for row, p in enumerate(positions.tolist()):
        for i in range(0, half, 5):
            angle = round_to_float32(Fraction(p) * Fraction(inv_freq[i].item()))  # one IEEE float32 multiply
            assert cos[row, i].item() == oracle("cos", angle) and sin[row, i].item() == oracle("sin", angle), (p, i)
    assert cos[0].tolist() == [1.0] * head_dim and sin[0].tolist() == [0.0] * head_dim


def test_rotary_tables_match_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF's LlamaRotaryEmbedding: inv_freq = 1 / float32(base^(2i/d)) is within one ulp of the correctly rounded
    one (not always equal); with HF's own inv_freq, every angle is the same float32 product and the tables agree
    to atol 1e-6 (cos/sin rounding alone) over 4096 positions; with ours, where an angle moves by p ulps of
    inv_freq, they agree to atol 1e-6 for small positions and to p * 2^-23 everywhere."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    head_dim, base, n = 64, 10000.0, 4096
    config = llama.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=head_dim, rope_theta=base
    )
    hf = llama.LlamaRotaryEmbedding(config)
    hf_cos, hf_sin = (t[0] for t in hf(torch.zeros(1, n, head_dim), torch.arange(n)[None]))
    ours = pointwise._inverse_frequencies(head_dim, base)
    assert ((hf.inv_freq.view(torch.int32) - ours.view(torch.int32)).abs() <= 1).all()
    cos, sin = pointwise.rotary_tables(torch.arange(n), head_dim, base)
    assert torch.allclose(cos[:48], hf_cos[:48], atol=1e-6) and torch.allclose(sin[:48], hf_sin[:48], atol=1e-6)
    bound = torch.arange(n, dtype=torch.float32)[:, None] * 2.0**-23 + 1e-6
    assert ((cos - hf_cos).abs() <= bound).all() and ((sin - hf_sin).abs() <= bound).all()
    monkeypatch.setattr(pointwise, "_inverse_frequencies", lambda d, b: hf.inv_freq.clone())
    cos, sin = pointwise.rotary_tables(torch.arange(n), head_dim, base)
    assert torch.allclose(cos, hf_cos, atol=1e-6) and torch.allclose(sin, hf_sin, atol=1e-6)


def test_rotary_tables_speed_threads_and_errors() -> None:
    import time

    pointwise._inverse_frequencies.cache_clear()
    start = time.perf_counter()
    one = pointwise.rotary_tables(torch.arange(4096), 64, 10000.0)
    assert time.perf_counter() - start < 10
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = pointwise.rotary_tables(torch.arange(2**24 - 2048, 2**24), 64, 500000.0)
        torch.set_num_threads(2)
        b = pointwise.rotary_tables(torch.arange(2**24 - 2048, 2**24), 64, 500000.0)
        two = pointwise.rotary_tables(torch.arange(4096), 64, 10000.0)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a + one, b + two, strict=True):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    with pytest.raises(ValueError, match="2\\^24"):
        pointwise.rotary_tables(torch.tensor([2**24]), 64, 10000.0)
    with pytest.raises(ValueError, match="2\\^24"):
        pointwise.rotary_tables(torch.tensor([-1]), 64, 10000.0)
    with pytest.raises(ValueError, match="head_dim"):
        pointwise.rotary_tables(torch.arange(3), 63, 10000.0)
    with pytest.raises(TypeError, match="positions"):
        pointwise.rotary_tables(torch.arange(3.0), 64, 10000.0)
    empty = pointwise.rotary_tables(torch.arange(0), 64, 10000.0)
    assert empty[0].shape == (0, 64) and empty[1].shape == (0, 64)
