"""Benchmark: how often the reference profile's rounding proof needs its exact fallback, and where a training
step of the default job spends its time.

    python python/benchmarks/bench_reference_step.py [--steps 2] [--base-model DIR]

Trains the first --steps steps of the default job under `reference` in this process (the first step also builds
the reference decoder: the float64 copies of the frozen weights), then prints the matrix-product elements the
float64 route left undecided (numerics.matmul.FALLBACKS) over those steps, how many of them the compensated sum
decided and how many needed exact integers (numerics.exact.FALLBACKS), the last step's time under cProfile, and
that step's top functions by their own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from reprolora.core import pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps, at least 2 (default 2)")
    parser.add_argument("--base-model", default="", help="default: the built-in model")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the last step is profiled, after the first builds the decoder")
    pins.apply("reference", 2)  # before torch is imported
    from reprolora.core import config
    from reprolora.numerics import exact, matmul
    from reprolora.training import distributed, train
    from reprolora.training.step import train_step

    overrides = ["profile=reference", f"train.max_steps={args.steps}"]
    if args.base_model:
        overrides.append(f"base_model.path={args.base_model}")
    job = train.setup(config.with_overrides(config.load(None), overrides))
    state, world = train.initial_state(job), distributed.world()
    for _ in range(args.steps - 1):
        train_step(job, state, world)
    profile = cProfile.Profile()
    tick = time.perf_counter()
    profile.runcall(train_step, job, state, world)
    seconds = time.perf_counter() - tick

    elements, undecided = matmul.FALLBACKS["elements"], matmul.FALLBACKS["undecided"]
    print(
        f"matmul: {undecided:,} of {elements:,} product elements undecided by the float64 route "
        f"({100 * undecided / max(elements, 1):.4f}%) over {args.steps} steps; of those the compensated sum "
        f"decided {exact.FALLBACKS['compensated']:,}, exact integers {exact.FALLBACKS['exact']:,}"
    )
    print(f"step {args.steps} under cProfile: {seconds:.1f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
