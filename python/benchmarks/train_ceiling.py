"""bench_train.py's analysis parts: the matrix products of one example's forward and backward pass (their FLOPs
and the fp32 matmul ceiling timed at their shapes), and the printout of the job's FLOPs, ceiling and profile."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

CEILING_SAMPLE = 12  # examples whose shapes the ceiling times, evenly spread over the job's lengths
CEILING_RUNS = 3  # each product's best of this many


def example_products(model: Any, config: Any, tokens: int, labelled: int) -> list[tuple[str, Callable, float, int]]:
    """The matrix products of one example's forward and backward pass: (kind, a function that makes the product
    on random operands of its shapes and layouts and returns it as a function of no arguments, its FLOPs, how many
    times the model runs it)."""
    import torch
    import torch.nn.functional as F

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape)

    def linear(n: int, fan_in: int, fan_out: int, trainable: bool) -> list[tuple[str, Callable, float]]:
        def operands() -> tuple[torch.Tensor, ...]:
            return rand(n, fan_in), rand(fan_out, fan_in), rand(n, fan_out)

        def forward() -> Callable:
            x, w, _ = operands()
            return lambda: F.linear(x, w)

        def input_gradient() -> Callable:
            _, w, g = operands()
            return lambda: g @ w

        def weight_gradient() -> Callable:
            x, _, g = operands()
            return lambda: g.t() @ x

        flops = 2.0 * n * fan_in * fan_out
        products = [("forward", forward, flops), ("input gradient", input_gradient, flops)]
        if trainable:
            products.append(("LoRA weight gradient", weight_gradient, flops))
        return products

    lm_head = model.get_output_embeddings()
    shapes: dict[tuple[int, int, bool], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not lm_head:
            key = (module.in_features, module.out_features, module.weight.requires_grad)
            shapes[key] = shapes.get(key, 0) + 1
    products = []
    for (fan_in, fan_out, trainable), count in sorted(shapes.items()):
        products += [(kind, fn, flops, count) for kind, fn, flops in linear(tokens, fan_in, fan_out, trainable)]
    products += [
        (f"output projection {kind}", fn, flops, 1)
        for kind, fn, flops in linear(labelled, lm_head.in_features, lm_head.out_features, False)
    ]
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or head_dim
    flops = 2.0 * heads * tokens * tokens * head_dim

    def attention(transpose_a: bool, transpose_b: bool, square_a: bool) -> Callable:
        def make() -> Callable:
            a = rand(heads, tokens, tokens) if square_a else rand(heads, tokens, head_dim)
            b = rand(heads, tokens, head_dim)
            a = a.transpose(1, 2) if transpose_a else a
            b = b.transpose(1, 2) if transpose_b else b
            return lambda: a @ b

        return make

    # forward Q K^T and P V; backward dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    for shape in (
        (False, True, False),
        (False, False, True),
        (False, True, False),
        (True, False, True),
        (False, False, True),
        (True, False, True),
    ):
        products.append(("attention", attention(*shape), flops, config.num_hidden_layers))
    return products


def best_seconds(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        tick = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tick)
    return best


def print_analysis(analysis: dict[str, Any]) -> None:
    """The job's FLOPs, the ceiling and the profile: printed before the long runs start."""
    flops = sum(analysis["flops"].values())
    print(
        f"model FLOPs of the job: {flops / 1e12:.3f} TFLOP ("
        + ", ".join(
            f"{kind} {value / flops:.1%}" for kind, value in sorted(analysis["flops"].items(), key=lambda kv: -kv[1])
        )
        + ")"
    )
    print(
        f"fp32 matmul ceiling at the job's shapes (native pins, {analysis['ceiling_sample']} examples' products, "
        f"best of {CEILING_RUNS}): {analysis['ceiling_gflops']:.1f} GFLOP/s"
    )
    print()
    print(
        f"where native's time goes: torch.profiler, {analysis['profile_steps']} training steps, "
        f"{analysis['profile_total_s']:.2f} s of self CPU time; top ops by self CPU time"
    )
    print(f"{'op':<52} {'self s':>8} {'share':>7} {'calls':>7}")
    for op in analysis["profile"][:15]:
        print(f"{op['op'][:52]:<52} {op['self_s']:8.3f} {op['share']:7.1%} {op['calls']:7d}")
    print(flush=True)
