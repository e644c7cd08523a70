"""What would a faster portable profile gain? The default model's micro-batch gradients on three MKL paths.

    python python/benchmarks/bench_mkl_paths.py [--rounds 2]

Each path is a fresh process with the pins of a profile, 2 threads, where only MKL_CBWR is replaced:
  native    AUTO,STRICT  (the native profile as it is)
  portable  AVX2,STRICT  (torch at AVX2, MKL's AVX2 branch in strict mode: thread-invariant, vendor-neutrality
                          not measured: see blas_vendor_hashes.py)
  portable  COMPATIBLE   (the portable profile as it is)
It times the gradients of the first two steps' micro-batches (after one warm-up), alternating the paths for
--rounds rounds, and prints the best time of each and its ratio to native's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import dataclasses, json, sys, time
from reprolora import pins
profile, cbwr = sys.argv[1], sys.argv[2]
pins._PROFILE_ISA[(profile, "x86_64")]["MKL_CBWR"] = cbwr  # a setting the pins never use: benchmark only
pins.apply(profile, 2)
from reprolora import base_model, train
from reprolora import config as config_module
from reprolora.optim import AdamW
base = config_module.load(None)
config = dataclasses.replace(base, profile=profile, base_model=dataclasses.replace(
    base.base_model, path=str(base_model.prepare_default())))
job = train.setup(config)
state = train.TrainState(0, {n: p for n, p in job.peft_model.named_parameters() if p.requires_grad}, None, [], {})
state.optimizer = AdamW(list(state.params.values()), weight_decay=0.0)
job.causal_lm.train()
micro_batches = [mb for step in job.plan[:2] for mb in step]
train.micro_batch_gradient(job, state, 0, micro_batches[0])  # warm-up
started = time.perf_counter()
for index, mb in enumerate(micro_batches):
    train.micro_batch_gradient(job, state, index, mb)
print(json.dumps({"seconds": time.perf_counter() - started, "micro_batches": len(micro_batches)}))
"""

PATHS = [("native", "AUTO,STRICT"), ("portable", "AVX2,STRICT"), ("portable", "COMPATIBLE")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {path: [] for path in PATHS}
    for _ in range(args.rounds):
        for path in PATHS:
            out = subprocess.run([sys.executable, "-c", CHILD, *path], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_mkl_paths: {path} failed:\n{out.stderr[-3000:]}")
            times[path].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    native = min(times[PATHS[0]])
    for (profile, cbwr), seconds in times.items():
        print(f"{profile:<9} MKL_CBWR={cbwr:<12} best {min(seconds):7.2f} s  ratio to native {min(seconds) / native:.2f}")


if __name__ == "__main__":
    main()
