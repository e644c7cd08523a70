"""Which MKL code paths make the matrix products of a training step independent of the thread count?

    python python/benchmarks/mkl_threads.py [MKL_CBWR values...]

(default values: AUTO AUTO,STRICT COMPATIBLE COMPATIBLE,STRICT)

For each MKL_CBWR value, two fresh processes (1 and 2 threads) run the forward and backward passes of the
default model's products (SmolLM2-135M: hidden 576, MLP 1536, 9 query and 3 key/value heads of 64, vocabulary
49,152) at 40 to 600 tokens: the projections, a LoRA pair (r = 16), the output projection, torch's
scaled_dot_product_attention and an attention written out as matmul + softmax. Prints, per value, which of them
give other bits at 2 threads than at 1. COMPATIBLE runs with ATEN_CPU_CAPABILITY=avx2, as the portable profile
does. The pins are not applied: this script sets the variables itself, to compare settings the pins never use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys
import torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))

def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

results = {}
def forward_backward(name, fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(rand(*out.shape, seed=99))
    digest = hashlib.sha256()
    for tensor in (out, *[x.grad for x in inputs]):
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    results[name] = digest.hexdigest()

for T in (40, 100, 157, 600):
    for k, n in ((576, 576), (576, 1536), (1536, 576), (576, 192)):
        forward_backward(f"[{T}x{k}]x[{k}x{n}]", lambda a, b: a @ b.T, rand(T, k), rand(n, k, seed=1) * 0.05)
    forward_backward(f"LoRA r16, T={T}", lambda a, b, c: (a @ b.T) @ c.T, rand(T, 576), rand(16, 576, seed=5) * 0.05,
                     rand(576, 16, seed=6) * 0.05)
    forward_backward(f"output projection, T={T}", lambda a, e: a @ e.T, rand(T, 576), rand(49152, 576, seed=7) * 0.05)
    q, k, v = rand(1, 9, T, 64, seed=10), rand(1, 3, T, 64, seed=11), rand(1, 3, T, 64, seed=12)
    forward_backward(f"sdpa, T={T}", lambda a, b, c: F.scaled_dot_product_attention(
        a, b.repeat_interleave(3, 1), c.repeat_interleave(3, 1), is_causal=True), q, k, v)
    mask = torch.full((T, T), float("-inf")).triu(1)
    forward_backward(f"matmul+softmax attention, T={T}", lambda a, b, c: torch.softmax(
        a @ b.repeat_interleave(3, 1).transpose(-1, -2) * 0.125 + mask, -1) @ c.repeat_interleave(3, 1), q, k, v)
print(json.dumps(results))
"""


def hashes(cbwr: str, threads: int) -> dict[str, str]:
    env = {**os.environ, "MKL_CBWR": cbwr, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if cbwr.startswith("COMPATIBLE"):
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"mkl_threads: MKL_CBWR={cbwr} at {threads} threads failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main() -> None:
    for cbwr in sys.argv[1:] or ["AUTO", "AUTO,STRICT", "COMPATIBLE", "COMPATIBLE,STRICT"]:
        one, two = hashes(cbwr, 1), hashes(cbwr, 2)
        differ = [name for name in one if one[name] != two[name]]
        print(
            f"MKL_CBWR={cbwr}: {len(differ)} of {len(one)} differ between 1 and 2 threads"
            + (": " + "; ".join(differ) if differ else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
