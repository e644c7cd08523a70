"""numerics.optim: AdamW reproduced bit for bit by an independent numpy float32 re-computation (numpy's float32
+ - * / and sqrt are IEEE operations) with scalars from exact Fractions rounded by exact.round_to_float32, and by
per-op Fractions; close to torch.optim.AdamW; its scalars exact for large step counts, ties and the
precision-doubling path; resumable from checkpointed state; the same bits with 1 or 2 threads and with ATen's
DEFAULT kernels. learning_rate exact (Fractions, Niven's exact cosines, a float64 tie), against mpmath and
training/optim.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch

from reprolora.numerics import optim
from reprolora.numerics.exact import round_to_float32
from reprolora.training import optim as native_optim


def bits(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().view(torch.int32).numpy().copy()


def exact_scalars(lr: float, wd: float, beta1: float, beta2: float, eps: float, t: int) -> dict[str, np.float32]:
    """The step's scalars straight from their definitions with exact Fraction powers."""
    lr_, b1, b2 = Fraction(lr), Fraction(beta1), Fraction(beta2)
    values = {
        "decay": 1 - lr_ * Fraction(wd),
        "beta1": b1,
        "one_minus_beta1": 1 - b1,
        "beta2": b2,
        "one_minus_beta2": 1 - b2,
        "bias_correction2": 1 - b2**t,
        "eps": Fraction(eps),
        "step_size": lr_ / (1 - b1**t),
    }
    return {name: np.float32(round_to_float32(value)) for name, value in values.items()}


def numpy_adamw(p, m, v, g, s):
    """The documented sequence, one numpy float32 op per line."""
    f = np.float32
    p = p * f(s["decay"])
    m = m * f(s["beta1"])
    m = m + g * f(s["one_minus_beta1"])
    v = v * f(s["beta2"])
    v = v + (g * g) * f(s["one_minus_beta2"])
    denom = np.sqrt(v / f(s["bias_correction2"])) + f(s["eps"])
    p = p - (m / denom) * f(s["step_size"])
    return p, m, v


def random_grads(generator: torch.Generator, shape, step: int) -> torch.Tensor:
    g = torch.randn(shape, generator=generator) * 10.0 ** float(step % 3 - 2)
    specials = torch.tensor([0.0, 1e-30, -3e-23])  # a zero, squares that underflow to zero or a subnormal
    if g.numel() >= 3:
        g.view(-1)[:3] = specials
    return g


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_matches_numpy_bit_for_bit(wd):
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 7), (16,), (3, 4, 2), (1,)]  # (1,): a one-element divisor, which ATen may treat as a scalar
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    optimizer = optim.AdamW(params, weight_decay=wd)
    state = [(p.detach().numpy().copy(), np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32)) for p in params]
    lrs = [optim.learning_rate(step, 6, 2, 3e-4, "cosine") for step in range(6)]
    for step, lr in enumerate(lrs):
        grads = [random_grads(generator, shape, step) for shape in shapes]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step(lr)
        optimizer.zero_grad()
        s = exact_scalars(lr, wd, 0.9, 0.999, 1e-8, step + 1)
        assert optimizer.scalars(lr, step + 1) == {name: float(value) for name, value in s.items()}
        state = [numpy_adamw(*st, grad.numpy(), s) for st, grad in zip(state, grads, strict=True)]
        for (p, m, v), param, m_t, v_t in zip(state, params, optimizer.exp_avg, optimizer.exp_avg_sq, strict=True):
            np.testing.assert_array_equal(bits(param), p.view(np.int32))
            np.testing.assert_array_equal(bits(m_t), m.view(np.int32))
            np.testing.assert_array_equal(bits(v_t), v.view(np.int32))
    assert optimizer.steps == 6


def test_adamw_matches_fractions_per_op():
    """Each op as the float32 rounding of the exact result of its float32 operands (sqrt exactly, by integers)."""

    def r(value: Fraction) -> Fraction:
        return Fraction(round_to_float32(value))

    param = torch.nn.Parameter(torch.tensor([1.5, -2.0, 1e-3, 0.0, 3e-38]))
    grad = torch.tensor([0.25, -1e-4, 7.0, 0.0, -1e-20])
    optimizer = optim.AdamW([param], weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    p = [Fraction(x) for x in param.tolist()]
    m = [Fraction(0)] * 5
    v = [Fraction(0)] * 5
    for t in (1, 2, 3):
        lr = 0.01 * t
        param.grad = grad
        optimizer.step(lr)
        s = {name: Fraction(value) for name, value in optimizer.scalars(lr, t).items()}
        for i, g in enumerate(Fraction(x) for x in grad.tolist()):
            p[i] = r(p[i] * s["decay"])
            m[i] = r(r(m[i] * s["beta1"]) + r(g * s["one_minus_beta1"]))
            v[i] = r(r(v[i] * s["beta2"]) + r(r(g * g) * s["one_minus_beta2"]))
            quotient = r(v[i] / s["bias_correction2"])
            root = Fraction(float(np.sqrt(np.float32(float(quotient)))))
            # proven the float32 nearest sqrt(quotient): the midpoints to its neighbours bracket it, squared exactly
            below, above = (
                np.nextafter(np.float32(root), np.float32(0)),
                np.nextafter(np.float32(root), np.float32(np.inf)),
            )
            if quotient > 0:
                assert (
                    ((Fraction(float(below)) + root) / 2) ** 2 < quotient < ((root + Fraction(float(above))) / 2) ** 2
                )
            denom = r(root + s["eps"])
            p[i] = r(p[i] - r(r(m[i] / denom) * s["step_size"]))
        assert param.tolist() == [float(x) for x in p]
        assert optimizer.exp_avg[0].tolist() == [float(x) for x in m]
        assert optimizer.exp_avg_sq[0].tolist() == [float(x) for x in v]


def test_adamw_close_to_torch():
    generator = torch.Generator().manual_seed(3)
    initial = [torch.randn(shape, generator=generator) for shape in [(32, 16), (16, 64)]]
    mine = [torch.nn.Parameter(x.clone()) for x in initial]
    theirs = [torch.nn.Parameter(x.clone()) for x in initial]
    optimizer = optim.AdamW(mine, weight_decay=0.01)
    reference = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for step in range(8):
        grads = [torch.randn(x.shape, generator=generator) for x in initial]
        lr = optim.learning_rate(step, 8, 3, 1e-3, "cosine")
        for group in reference.param_groups:
            group["lr"] = lr
        for a, b, g in zip(mine, theirs, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        optimizer.step(lr)
        reference.step()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(optimizer.exp_avg_sq, [reference.state[p]["exp_avg_sq"] for p in theirs], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_restored_state_continues_identically():
    """What training/checkpoint.py saves (params, exp_avg, exp_avg_sq, steps), copied into a fresh optimizer,
    gives the same bits as running on."""
    generator = torch.Generator().manual_seed(5)
    initial = [torch.randn(shape, generator=generator) for shape in [(8, 3), (4,)]]
    grads = [[torch.randn(x.shape, generator=generator) for x in initial] for _ in range(4)]
    lrs = [optim.learning_rate(step, 4, 1, 1e-3, "cosine") for step in range(4)]

    def run(optimizer: optim.AdamW, steps: range) -> None:
        for step in steps:
            for param, grad in zip(optimizer.params, grads[step], strict=True):
                param.grad = grad
            optimizer.step(lrs[step])
            optimizer.zero_grad()

    straight = optim.AdamW([torch.nn.Parameter(x.clone()) for x in initial], weight_decay=0.01)
    run(straight, range(4))
    first = optim.AdamW([torch.nn.Parameter(x.clone()) for x in initial], weight_decay=0.01)
    run(first, range(2))
    resumed = optim.AdamW([torch.nn.Parameter(torch.zeros_like(x)) for x in initial], weight_decay=0.01)
    with torch.no_grad():
        for kind in ("params", "exp_avg", "exp_avg_sq"):
            for target, source in zip(getattr(resumed, kind), getattr(first, kind), strict=True):
                target.copy_(source)
    resumed.steps = first.steps
    run(resumed, range(2, 4))
    for kind in ("params", "exp_avg", "exp_avg_sq"):
        for a, b in zip(getattr(straight, kind), getattr(resumed, kind), strict=True):
            np.testing.assert_array_equal(bits(a), bits(b))


def test_adamw_skips_missing_grads_and_checks_dtypes():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = optim.AdamW([a, b], weight_decay=0.5)
    a.grad = torch.ones(3)
    optimizer.step(0.1)
    assert b.tolist() == [1.0, 1.0] and a.tolist() != [1.0, 1.0, 1.0]
    with pytest.raises(TypeError):
        optim.AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], weight_decay=0.0)
    with pytest.raises(ValueError):
        optim.AdamW([a], weight_decay=0.0, betas=(1.0, 0.999))


@pytest.mark.parametrize("t", [1, 2, 10, 179, 180, 1000, 4000])
def test_scalars_exact_at_large_step_counts(t):
    optimizer = optim.AdamW([], weight_decay=0.01)
    lr = 2.9999999999999997e-4
    expected = exact_scalars(lr, 0.01, 0.9, 0.999, 1e-8, t)
    assert optimizer.scalars(lr, t) == {name: float(value) for name, value in expected.items()}


def test_scalars_for_huge_step_counts():
    optimizer = optim.AdamW([], weight_decay=0.0)
    s = optimizer.scalars(1e-3, 10**7)
    # beta^t <= e^(-t (1 - beta)) is far below 2^-25, half an ulp below 1: both corrections round to 1 exactly
    assert s["bias_correction2"] == 1.0
    assert s["step_size"] == round_to_float32(Fraction(1e-3))


def test_scalar_ties_round_to_even():
    # beta = 1/2 has one bit: 1 - 2^-25 is the midpoint between 1 - 2^-24 and 1 and rounds to 1 (even)
    optimizer = optim.AdamW([], weight_decay=0.0, betas=(0.5, 0.5))
    assert optimizer.scalars(1.0, 25)["bias_correction2"] == 1.0
    assert optimizer.scalars(1.0, 24)["bias_correction2"] == 1.0 - 2.0**-24
    assert optimizer.scalars(1.0, 26)["bias_correction2"] == 1.0
    # t = 1: step_size = lr / (1/2) = 2 lr; 2 lr = 1 + 2^-24 is a midpoint (ties to 1), 1 + 3 * 2^-24 to 1 + 2^-22
    assert optimizer.scalars((1 + 2.0**-24) / 2, 1)["step_size"] == 1.0
    assert optimizer.scalars((1 + 3 * 2.0**-24) / 2, 1)["step_size"] == 1 + 2.0**-22


def test_power_precision_doubling(monkeypatch):
    monkeypatch.setattr(optim, "_POWER_PRECISION", 4)
    before = optim.FALLBACKS["power"]
    optimizer = optim.AdamW([], weight_decay=0.01)
    for t in (1, 3, 50, 700):
        expected = exact_scalars(1e-3, 0.01, 0.9, 0.999, 1e-8, t)
        assert optimizer.scalars(1e-3, t) == {name: float(value) for name, value in expected.items()}
    assert optim.FALLBACKS["power"] > before


def test_power_bounds_bracket_and_exact():
    for beta, t, precision in [(0.9, 37, 64), (0.999, 1234, 128), (0.3, 5, 16)]:
        low, high = optim._power_bounds(beta, t, precision)
        exact = Fraction(beta) ** t * 2**precision
        assert low <= exact <= high
    low, high = optim._power_bounds(0.75, 20, 40)  # 2 bits * 20 <= 40: exact
    assert low == high == Fraction(3, 4) ** 20 * 2**40


def test_threads_do_not_change_bits():
    def run() -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(576, 16), (1536, 64)]]
        optimizer = optim.AdamW(params, weight_decay=0.01)
        for step in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step(optim.learning_rate(step, 10, 1, 2e-4, "cosine"))
        return [bits(x) for x in params + optimizer.exp_avg + optimizer.exp_avg_sq]

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------- schedule


def test_warmup_linear_constant_exact():
    peak = 3e-4
    for step in range(7):
        assert optim.learning_rate(step, 20, 7, peak, "cosine") == float(Fraction(peak) * (step + 1) / 7)
    for step in range(7, 20):
        assert optim.learning_rate(step, 20, 7, peak, "linear") == float(Fraction(peak) * (1 - Fraction(step - 7, 13)))
        assert optim.learning_rate(step, 20, 7, peak, "constant") == peak
    assert optim.learning_rate(5, 10, 0, peak, "linear") == float(Fraction(peak) / 2)
    with pytest.raises(ValueError):
        optim.learning_rate(5, 10, 0, peak, "exponential")


def test_cosine_exact_points():
    peak = 3e-4
    assert optim.learning_rate(0, 4, 0, peak, "cosine") == peak
    assert optim.learning_rate(2, 4, 0, peak, "cosine") == peak / 2  # progress 1/2: cos = 0 exactly
    assert optim.learning_rate(1, 3, 0, peak, "cosine") == float(Fraction(peak) * 3 / 4)  # 1/3: cos = 1/2
    assert optim.learning_rate(2, 3, 0, peak, "cosine") == peak / 4  # 2/3: cos = -1/2
    assert optim.learning_rate(3, 3, 0, peak, "cosine") == 0.0
    # a float64 tie: 3/4 (1 + 2^-52) = 3/4 + 1.5 * 2^-53 lies midway between two float64s; it rounds to even
    assert optim.learning_rate(1, 3, 0, 1 + 2.0**-52, "cosine") == 0.75 + 2.0**-52
    assert optim.learning_rate(9, 13, 1, 1 + 2.0**-52, "cosine") == float(Fraction(1 + 2.0**-52) / 4)


def mpmath_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    with mpmath.workprec(600):
        progress = mpmath.mpf(step - warmup) / max(1, total - warmup)
        value = mpmath.mpf(peak) * (1 + mpmath.cos(mpmath.pi * progress)) / 2
        sign, mantissa, exponent, _ = value._mpf_
        return float((-1) ** sign * Fraction(int(mantissa)) * Fraction(2) ** int(exponent))


def ulps(a: float, b: float) -> int:
    return abs(np.float64(a).view(np.int64) - np.float64(b).view(np.int64))


def test_cosine_against_mpmath_and_native():
    for total, warmup, peak in [(100, 10, 3e-4), (997, 0, 1e-3), (40, 3, 0.1)]:
        for step in range(warmup, total, max(1, (total - warmup) // 37)):
            mine = optim.learning_rate(step, total, warmup, peak, "cosine")
            assert mine == mpmath_cosine(step, total, warmup, peak)
            native = native_optim.learning_rate(step, total, warmup, peak, "cosine")
            # native rounds pi * progress, cos and the products: an absolute error of a few 2^-53 peak (so many
            # ulps near progress 1, where 1 + cos cancels); within 1 ulp early on
            assert abs(mine - native) <= 4 * 2.0**-52 * peak
            if step - warmup < (total - warmup) / 4:
                assert ulps(mine, native) <= 1
        for step in range(total):
            constant = optim.learning_rate(step, total, warmup, peak, "constant")
            assert constant == (peak if step >= warmup else float(Fraction(peak) * (step + 1) / warmup))
            mine = optim.learning_rate(step, total, warmup, peak, "linear")
            native = native_optim.learning_rate(step, total, warmup, peak, "linear")
            if step < warmup:  # peak * (step + 1) / warmup: two roundings
                assert ulps(mine, native) <= 1
            else:  # 1 - progress cancels the rounding error of progress near the end
                assert math.isclose(mine, native, rel_tol=1e-13)


def test_cosine_precision_doubling(monkeypatch):
    monkeypatch.setattr(optim, "_COSINE_PRECISION", 20)
    before = optim.FALLBACKS["cosine"]
    for step in (1, 5, 9):
        assert optim.learning_rate(step, 10, 0, 3e-4, "cosine") == mpmath_cosine(step, 10, 0, 3e-4)
    assert optim.FALLBACKS["cosine"] > before


ISA_SCRIPT = """
import sys, numpy, torch
from reprolora.numerics import optim
rng = numpy.random.default_rng(13)  # not torch.randn: its vectorised normal sampler differs by ISA
draw = lambda: torch.from_numpy(rng.standard_normal((96, 40)).astype(numpy.float32))
params = [torch.nn.Parameter(draw())]
optimizer = optim.AdamW(params, weight_decay=0.01)
for step in range(3):
    params[0].grad = draw()
    optimizer.step(optim.learning_rate(step, 5, 1, 1e-3, "cosine"))
tensors = params + optimizer.exp_avg + optimizer.exp_avg_sq
sys.stdout.write(b"".join(x.detach().numpy().tobytes() for x in tensors).hex())
"""


def test_isa_does_not_change_bits():
    """ATen's DEFAULT (non-vector) kernels give the bits this machine's vectorised ones (AVX2 or AVX512) give."""
    import os
    import subprocess
    import sys

    outputs = []
    for capability in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(optim.__file__)))
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2 * 3 * 96 * 40 * 4
