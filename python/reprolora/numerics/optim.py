"""AdamW and the learning-rate schedule with one answer: every scalar rounded once from its exact value, every
tensor update a written-out sequence of single IEEE-754 float32 operations (the `reference` profile).

`learning_rate` is the float64 nearest to the schedule's exact real value (exact rationals for warmup, linear and
constant; cos of pi times a rational through mpmath with a precision-doubling rounding proof for cosine).
`AdamW.step` rounds each of its scalars (1 - lr*wd, beta1, 1 - beta1, beta2, 1 - beta2, 1 - beta2^t, eps,
lr / (1 - beta1^t)) once, from exact rationals, to float32, and then updates each tensor by float32 multiplies,
adds, subtracts, divides (each its own tensor op, so no FMA can form) and `pointwise.sqrt`, which is correctly
rounded. The bits depend on the inputs alone, not on the CPU, BLAS, ISA, torch version or thread count.

`FALLBACKS[name]` counts how often a rounding proof needed more precision than the first try ("power": the
fixed-point powers of beta; "cosine": the mpmath cosine), for the tests.
"""

from __future__ import annotations

import collections
from fractions import Fraction

import torch

from reprolora.numerics.exact import round_to_float32
from reprolora.numerics.pointwise import sqrt

FALLBACKS: collections.Counter[str] = collections.Counter()

_POWER_PRECISION = 128  # first fixed-point precision (bits after the point) for beta^t; doubles until decided
_COSINE_PRECISION = 200  # first mpmath precision (bits) for the cosine schedule; doubles until decided


# ---------------------------------------------------------------------------------------------------- schedule


def _round_float64(value: Fraction) -> float:
    """The float64 nearest the exact rational `value`, ties to even (CPython's int / int is correctly rounded)."""
    return value.numerator / value.denominator


def _cos_pi_exact(progress: Fraction) -> Fraction | None:
    """cos(pi * progress) when it is rational, else None.

    Niven's theorem: for rational r, cos(pi r) is rational only when it is 0, +-1/2 or +-1, which happens exactly
    at r = 0, 1/3, 1/2, 2/3, 1, 4/3, 3/2, 5/3 (mod 2).
    """
    exact = {
        Fraction(0): Fraction(1),
        Fraction(1, 3): Fraction(1, 2),
        Fraction(1, 2): Fraction(0),
        Fraction(2, 3): Fraction(-1, 2),
        Fraction(1): Fraction(-1),
        Fraction(4, 3): Fraction(-1, 2),
        Fraction(3, 2): Fraction(0),
        Fraction(5, 3): Fraction(1, 2),
    }
    return exact.get(progress % 2)


def _cosine(peak: Fraction, progress: Fraction) -> float:
    """The float64 nearest peak * (1 + cos(pi * progress)) / 2 (see learning_rate)."""
    exact = _cos_pi_exact(progress)
    if exact is not None:
        return _round_float64(peak * (1 + exact) / 2)
    import mpmath  # lazy: torch brings it (through sympy)

    from reprolora.numerics.pointwise import _mpf_fraction

    reduced = progress % 2
    precision = _COSINE_PRECISION
    while True:
        with mpmath.workprec(precision):
            cosine = _mpf_fraction(mpmath.cospi(mpmath.mpf(reduced.numerator) / reduced.denominator))
        value = peak * (1 + cosine) / 2
        # mpf(reduced) is within 2^-precision * 2 of reduced (|reduced| < 2), cos(pi x) moves by at most pi times
        # that, and mpmath's cospi is within a few units of 2^-precision: |cosine - cos(pi reduced)| < 2^(4 -
        # precision). 2^(8 - precision) * |peak| bounds value's error with room to spare.
        slack = abs(peak) / 2 ** (precision - 8)
        low, high = _round_float64(value - slack), _round_float64(value + slack)
        if low == high:
            return low
        FALLBACKS["cosine"] += 1
        precision *= 2


def learning_rate(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """The learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine, linear or
    constant until `total` (training/optim.py's meaning), as the float64 nearest the exact value (ties to even).

    With P = Fraction(peak) (the float's exact binary value) and, after warmup, the exact rational
    progress = (step - warmup) / max(1, total - warmup):
      step < warmup:  P * (step + 1) / warmup
      "constant":     P
      "linear":       P * (1 - progress)
      "cosine":       P * (1 + cos(pi * progress)) / 2
    The rational cases are exact Fractions rounded once. For cosine, where cos(pi * progress) is rational (Niven's
    theorem: progress = 0, 1/3, 1/2, 2/3, 1, ... mod 2) it is used exactly; otherwise the value is irrational, so
    never a float64 midpoint, and mpmath computes it at 200 bits, precision doubling until both ends of the error
    interval (2^(8 - precision) |P|, far above mpmath's error) round to the same float64 - which always happens.
    The schedule's result is never rounded to float32 by itself: AdamW.step takes its exact float64 value into the
    rationals 1 - lr * weight_decay and lr / (1 - beta1^t), each rounded once to float32.
    """
    peak_exact = Fraction(peak)
    if step < warmup:
        return _round_float64(peak_exact * (step + 1) / warmup)
    if schedule == "constant":
        return float(peak)
    progress = Fraction(step - warmup, max(1, total - warmup))
    if schedule == "linear":
        return _round_float64(peak_exact * (1 - progress))
    if schedule == "cosine":
        return _cosine(peak_exact, progress)
    raise ValueError(f"numerics.learning_rate: unknown schedule {schedule!r}")


# ---------------------------------------------------------------------------------------------------- AdamW


def _power_bounds(beta: float, t: int, precision: int) -> tuple[int, int]:
    """Integers (low, high) with low <= beta^t * 2^precision <= high, by squaring in fixed point: each product of
    non-negative bounds rounded down for `low` and up for `high`. When beta's binary expansion has k bits after the
    point and k * t <= precision, every product is exact and low == high == beta^t * 2^precision."""
    numerator, denominator = beta.as_integer_ratio()  # denominator a power of two
    scale = 1 << precision
    base_low, base_high = (numerator << precision) // denominator, -((-numerator << precision) // denominator)
    low = high = scale
    while t:
        if t & 1:
            low, high = (low * base_low) >> precision, -((-high * base_high) >> precision)
        t >>= 1
        if t:
            base_low, base_high = (base_low * base_low) >> precision, -((-base_high * base_high) >> precision)
    return low, high


def _bias_scalars(lr: Fraction, beta1: float, beta2: float, t: int) -> tuple[float, float]:
    """(float32 nearest 1 - beta2^t, float32 nearest lr / (1 - beta1^t)), exactly (see AdamW.step)."""
    results = []
    for beta, rounded in ((beta2, lambda one_minus: one_minus), (beta1, lambda one_minus: lr / one_minus)):
        precision = _POWER_PRECISION
        while True:
            low, high = _power_bounds(beta, t, precision)
            scale = 1 << precision
            if high < scale:  # 1 - beta^t lies in [(scale - high) / scale, (scale - low) / scale], both > 0
                ends = {round_to_float32(rounded(Fraction(scale - bound, scale))) for bound in (low, high)}
                if len(ends) == 1:  # the value lies between the ends and rounding is monotonic
                    results.append(ends.pop())
                    break
            FALLBACKS["power"] += 1
            precision *= 2  # exact (low == high) once precision >= t * bits of beta, so the loop ends
    return results[0], results[1]


class AdamWState:
    """What an AdamW keeps, this module's and training/optim.py's alike: `params` (the parameters, updated in
    place), `exp_avg` and `exp_avg_sq` (the moments, tensors shaped like them, updated in place), `steps` (the
    number of steps taken; shared by every parameter), and the hyperparameters as floats (their exact binary values
    are what AdamW.scalars rounds from). training/checkpoint.py saves and restores exactly the tensors and steps.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.check_arguments(params, betas, eps)
        self.params = params
        self.weight_decay, self.betas, self.eps = float(weight_decay), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def check_arguments(self, params: list[torch.nn.Parameter], betas: tuple[float, float], eps: float) -> None:
        """Refuse arguments this optimizer cannot step with, before anything is allocated (here: none)."""

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


class AdamW(AdamWState):
    """AdamW (decoupled weight decay, bias-corrected moments; torch.optim.AdamW's semantics) whose update is a
    written-out sequence of single IEEE float32 operations, on float32 parameters (state: AdamWState's).
    """

    def check_arguments(self, params: list[torch.nn.Parameter], betas: tuple[float, float], eps: float) -> None:
        for param in params:
            if param.dtype != torch.float32:
                raise TypeError(f"numerics.AdamW: expects float32 parameters, got {param.dtype}")
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"numerics.AdamW: betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"numerics.AdamW: eps must be >= 0, got {eps}")

    def scalars(self, lr: float, t: int) -> dict[str, float]:
        """The float32 scalars of step number t (1-based) at learning rate lr, each the float32 nearest (ties to
        even) an exact rational of the exact binary values of lr, weight_decay, betas and eps (see step)."""
        lr_exact, beta1, beta2 = Fraction(lr), Fraction(self.betas[0]), Fraction(self.betas[1])
        bias_correction2, step_size = _bias_scalars(lr_exact, self.betas[0], self.betas[1], t)
        return {
            "decay": round_to_float32(1 - lr_exact * Fraction(self.weight_decay)),
            "beta1": round_to_float32(beta1),
            "one_minus_beta1": round_to_float32(1 - beta1),
            "beta2": round_to_float32(beta2),
            "one_minus_beta2": round_to_float32(1 - beta2),
            "bias_correction2": bias_correction2,
            "eps": round_to_float32(Fraction(self.eps)),
            "step_size": step_size,
        }

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step at learning rate lr (a float64, e.g. learning_rate's) from each parameter's .grad.

        Scalars, with t = steps after the increment, every input taken as its exact binary value (lr and
        weight_decay float64, betas and eps as given) and each result rounded once to float32 (ties to even):
          decay = 1 - lr * weight_decay       b1 = beta1      c1 = 1 - beta1      b2 = beta2      c2 = 1 - beta2
          bc2 = 1 - beta2^t                   e = eps         step_size = lr / (1 - beta1^t)
        beta^t is bounded in fixed point (`_power_bounds`, 128 bits, doubling while the two bounds round apart;
        exact once the precision reaches t times beta's bits), so a large t costs O(log t) multiplies.

        Then, for each parameter p with gradient g (float32), moments m, v, in this order, each line one float32
        IEEE operation per element (round to nearest even; separate tensor ops, so nothing fuses):
          p = p * decay
          m = m * b1;  m = m + g * c1                      (g * c1 first)
          v = v * b2;  v = v + (g * g) * c2                (g * g, then * c2)
          denom = sqrt(v / bc2) + e                        (bc2 a full tensor: ATen may turn a division by a scalar
                                                            into a multiply by its reciprocal; pointwise.sqrt,
                                                            correctly rounded)
          p = p - (m / denom) * step_size
        This is torch.optim.AdamW's update (it computes sqrt(v) / sqrt(bc2) and rounds in another order; the real
        numbers are the same). Zeros: v = 0 gives denom = e and an update of m / e (0 where m = 0). NaN and
        infinities propagate as IEEE says; subnormals are kept (torch's default; set_flush_denormal would change
        bits). Parameters whose .grad is None are skipped, as torch does (steps still counts for all).
        """
        self.steps += 1
        s = self.scalars(lr, self.steps)
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            grad = param.grad
            if grad is None:
                continue
            if grad.dtype != torch.float32:
                raise TypeError(f"numerics.AdamW: expects float32 gradients, got {grad.dtype}")
            param.mul_(s["decay"])
            exp_avg.mul_(s["beta1"])
            exp_avg.add_(grad * s["one_minus_beta1"])
            exp_avg_sq.mul_(s["beta2"])
            exp_avg_sq.add_((grad * grad) * s["one_minus_beta2"])
            denom = sqrt(exp_avg_sq / torch.full_like(exp_avg_sq, s["bias_correction2"])) + s["eps"]
            param.sub_((exp_avg / denom) * s["step_size"])
