"""The optimizer and the learning-rate schedule, written out so their bits depend on nothing but their inputs."""

from __future__ import annotations

import math

import torch

from reprolora.numerics.optim import AdamWState


class AdamW(AdamWState):
    """AdamW (decoupled weight decay, bias-corrected moments) built from elementwise ops that give the same bits
    on every CPU for a given instruction set (state: numerics.optim.AdamWState's, which checkpoints save).

    torch.optim.AdamW takes its square root from MKL's vector math library on MKL builds of torch, and that
    square root gives different bits on Intel and AMD CPUs, even with MKL_CBWR=COMPATIBLE (measured). rsqrt and
    division are ATen's own kernels, exact IEEE operations.
    """

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2 = 1 - beta2**self.steps
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            grad = param.grad
            param.mul_(1 - lr * self.weight_decay)
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # sqrt(v_hat) as 1 / rsqrt(v_hat); rsqrt(0) = inf gives 0, as sqrt(0) would.
            denom = torch.ones_like(exp_avg_sq).div_(torch.rsqrt(exp_avg_sq / bias_correction2)).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def learning_rate(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine, linear or constant until `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
