"""Do two CPUs give the same bits for the training step's matrix products? A record to compare across vendors.

    python python/benchmarks/blas_vendor_hashes.py                      # print this machine's record (JSON)
    python python/benchmarks/blas_vendor_hashes.py --against FILE       # compare with another machine's record

For issue 10's question (a fast BLAS path whose bits do not depend on the CPU vendor), each candidate path runs
the default model's products (SmolLM2-135M: hidden 576, MLP 1536, LoRA r = 16, vocabulary 49,152; 40 to 600
tokens, forward and the two backward products) in fresh processes at 1 and 2 threads, on inputs from numpy's
seeded PCG64 generator, and hashes each result:

  openblas-haswell   numpy's bundled OpenBLAS with OPENBLAS_CORETYPE=Haswell (what nixpkgs' torch uses)
  mkl-compatible     torch's MKL with MKL_CBWR=COMPATIBLE and ATEN_CPU_CAPABILITY=avx2 (the portable profile)
  mkl-avx2-strict    torch's MKL with MKL_CBWR=AVX2,STRICT (thread-invariant; across vendors: the question)

Then the whole of a training micro-batch, where the products meet torch's own kernels (RoPE's sin and cos,
softmax, SiLU, RMSNorm, cross-entropy): under the pins of each x86-64 profile that claims or seeks bytes shared
across CPUs (portable, portable-fast), at 1 and 2 threads, the gradient of each micro-batch of the default job's
first two steps, from the untrained adapter (`model/<profile>/<threads>t` in the record; needs the default base
model, which reprolora prepares on first use).

A record made on one vendor's CPU (--output) and compared on the other's (--against) says, per path, whether
every product has the same bits: the measurement a cross-vendor claim needs. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PATHS = {
    "openblas-haswell": ("numpy", {"OPENBLAS_CORETYPE": "Haswell"}),
    "mkl-compatible": ("torch", {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}),
    "mkl-avx2-strict": ("torch", {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}),
}

CHILD = r"""
import hashlib, json, sys
import numpy as np
library = sys.argv[1]
if library == "torch":
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    matmul = lambda a, b: (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()
else:
    matmul = lambda a, b: a @ b
rng = np.random.Generator(np.random.PCG64(20261126))
def rand(*shape):
    return rng.standard_normal(shape, dtype=np.float32)
results = {}
for tokens in (40, 100, 157, 600):
    for k, n in ((576, 576), (576, 1536), (1536, 576), (576, 16), (16, 576), (576, 49152)):
        x, w, dy = rand(tokens, k), rand(k, n) * np.float32(0.05), rand(tokens, n)
        # forward x.w, the input gradient dy.w^T and the weight gradient x^T.dy (a reduction over the tokens)
        for name, a, b in (("fwd", x, w), ("dx", dy, np.ascontiguousarray(w.T)), ("dw", np.ascontiguousarray(x.T), dy)):
            product = np.ascontiguousarray(matmul(a, b))
            results[f"T={tokens} [{k}x{n}] {name}"] = hashlib.sha256(product.tobytes()).hexdigest()
print(json.dumps(results))
"""

MODEL_CHILD = r"""
import dataclasses, hashlib, json, sys
from reprolora.core import pins
profile, threads = sys.argv[1], int(sys.argv[2])
pins.apply(profile, threads)
from reprolora.models import base_model
from reprolora.training import train
from reprolora.training.step import micro_batch_gradient
from reprolora.core import config as config_module
defaults = config_module.load(None)
config = dataclasses.replace(defaults, profile=profile, threads=threads, base_model=dataclasses.replace(
    defaults.base_model, path=str(base_model.prepare_default())))
job = train.setup(config)
state = train.initial_state(job)
job.causal_lm.train()
results = {}
for step in range(2):
    state.step = step  # dropout's seed follows the step
    for index, examples in enumerate(job.plan[step]):
        gradient = micro_batch_gradient(job, state, index, examples)
        results[f"step {step} micro-batch {index}"] = hashlib.sha256(gradient.numpy().tobytes()).hexdigest()
print(json.dumps(results))
"""
MODEL_PROFILES = ("portable", "portable-fast")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def record() -> dict:
    paths = {}
    for name, (library, env) in PATHS.items():
        for threads in (1, 2):
            environment = {
                **os.environ,
                **env,
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads),
            }
            out = subprocess.run(
                [sys.executable, "-c", CHILD, library, str(threads)], env=environment, capture_output=True, text=True
            )
            if out.returncode != 0:
                sys.exit(f"blas_vendor_hashes: {name} at {threads} threads failed:\n{out.stderr[-3000:]}")
            paths[f"{name}/{threads}t"] = json.loads(out.stdout)
    for profile in MODEL_PROFILES:
        for threads in (1, 2):
            out = subprocess.run(
                [sys.executable, "-c", MODEL_CHILD, profile, str(threads)], capture_output=True, text=True
            )
            if out.returncode != 0:
                sys.exit(
                    f"blas_vendor_hashes: the model under {profile} at {threads} threads failed:\n{out.stderr[-3000:]}"
                )
            paths[f"model/{profile}/{threads}t"] = json.loads(out.stdout.strip().splitlines()[-1])
    import numpy
    import torch

    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "paths": paths,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write this machine's record here (default: print it)")
    parser.add_argument("--against", type=Path, help="another machine's record to compare with")
    args = parser.parse_args()
    mine = record()
    if args.output:
        args.output.write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
    elif not args.against:
        print(json.dumps(mine, indent=1, sort_keys=True))
    for key, products in mine["paths"].items():
        threads_twin = key.replace("/1t", "/2t") if key.endswith("/1t") else key.replace("/2t", "/1t")
        same = sum(products[p] == mine["paths"][threads_twin][p] for p in products)
        print(f"{key:<26} this machine, 1 vs 2 threads: {same} of {len(products)} results the same", file=sys.stderr)
    if args.against:
        other = json.loads(args.against.read_text())
        print(f"this machine: {mine['cpu']} (numpy {mine['numpy']}, torch {mine['torch']})")
        print(f"other:        {other['cpu']} (numpy {other['numpy']}, torch {other['torch']})")
        for key, products in mine["paths"].items():
            if key not in other["paths"]:
                print(f"{key:<26} not in the other record")
                continue
            theirs = other["paths"][key]
            same = sum(products[p] == theirs.get(p) for p in products)
            print(f"{key:<26} {same} of {len(products)} results have the same bits on both CPUs")


if __name__ == "__main__":
    main()
