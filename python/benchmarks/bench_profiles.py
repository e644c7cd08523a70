"""What does each profile cost? The default model's micro-batch gradients under each profile's pins.

    python python/benchmarks/bench_profiles.py [--rounds 2] [--base-model DIR]

Each profile is a fresh process with its pins, 2 threads:
  native         torch's own ISA, MKL_CBWR=AUTO,STRICT
  portable-fast  torch at AVX2, MKL_CBWR=AVX2,STRICT (thread-invariant; products measured vendor-neutral)
  portable       torch at AVX2, MKL_CBWR=COMPATIBLE (vendor-neutral, measured on a whole job)
It times the gradients of the first two steps' micro-batches (after one warm-up), alternating the profiles for
--rounds rounds, and prints the best time of each and its ratio to native's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import dataclasses, json, sys, time
from reprolora.core import pins
profile, base_dir = sys.argv[1], sys.argv[2]
pins.apply(profile, 2)
from reprolora.models import base_model
from reprolora.training import train
from reprolora.training.step import micro_batch_gradient
from reprolora.core import config as config_module
base = config_module.load(None)
config = dataclasses.replace(base, profile=profile, base_model=dataclasses.replace(
    base.base_model, path=base_dir or str(base_model.prepare_default())))
job = train.setup(config)
state = train.initial_state(job)
job.causal_lm.train()
micro_batches = [mb for step in job.plan[:2] for mb in step]
micro_batch_gradient(job, state, 0, micro_batches[0])  # warm-up
started = time.perf_counter()
for index, mb in enumerate(micro_batches):
    micro_batch_gradient(job, state, index, mb)
print(json.dumps({"seconds": time.perf_counter() - started, "micro_batches": len(micro_batches)}))
"""

PROFILES = ["native", "portable-fast", "portable"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-model", default="", help="default: the built-in model, prepared into the cache")
    args = parser.parse_args()
    times: dict[str, list[float]] = {profile: [] for profile in PROFILES}
    for _ in range(args.rounds):
        for profile in PROFILES:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, profile, args.base_model], capture_output=True, text=True
            )
            if out.returncode != 0:
                sys.exit(f"bench_profiles: {profile} failed:\n{out.stderr[-3000:]}")
            times[profile].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    native = min(times["native"])
    for profile, seconds in times.items():
        print(f"{profile:<14} best {min(seconds):7.2f} s  ratio to native {min(seconds) / native:.2f}")


if __name__ == "__main__":
    main()
