"""Which operations of the training step change their bits with the thread count? A per-op hash battery.

    python python/benchmarks/thread_battery.py [--threads 1 2 4] [--profile native] [--base-model DIR]

Each thread count runs in a fresh process (the pins fix the thread count when torch loads). Every op runs on
the same seeded inputs at the shapes of the default model (SmolLM2-135M: hidden 576, MLP 1536, 9 heads of 64,
vocabulary 49,152) and of the tiny test model; its output (and, for backward ops, its gradients) is hashed.
Finally the whole training step (reprolora's forward, backward and per-micro-batch gradient) of the tiny model
and, with --base-model or the cached default model, of the real one. Prints one row per op: whether the bits
are the same at every thread count, and the time at each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
from reprolora.core import pins
threads, profile, base_dir, tiny_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
pins.apply(profile, threads)
import torch
import torch.nn.functional as F
from reprolora.training import train
from reprolora.training.optim import AdamW
from reprolora.training.step import chunked_sum, grad_norm, micro_batch_gradient

results = {}

def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]

def run(name, fn, repeat=3):
    out = fn()
    tick = time.perf_counter()
    for _ in range(repeat):
        fn()
    results[name] = {"hash": digest(*out), "ms": (time.perf_counter() - tick) / repeat * 1000}

def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g)

def fwd_bwd(fn, *inputs):
    def go():
        xs = [x.clone().requires_grad_(True) for x in inputs]
        y = fn(*xs)
        y.backward(rand(*y.shape, seed=99))
        return [y] + [x.grad for x in xs]
    return go

for label, hidden, mlp, heads, kv, vocab in (("135M", 576, 1536, 9, 3, 49152), ("tiny", 32, 64, 4, 2, 259)):
    hd = hidden // heads
    for T in (157, 600):
        x, w = rand(T, hidden), rand(hidden, hidden, seed=1) * 0.05
        run(f"{label} matmul [{T}x{hidden}]x[{hidden}x{hidden}] fwd/bwd", fwd_bwd(lambda a, b: a @ b.T, x, w))
        run(f"{label} matmul [{T}x{hidden}]x[{hidden}x{mlp}] fwd/bwd",
            fwd_bwd(lambda a, b: a @ b.T, x, rand(mlp, hidden, seed=2) * 0.05))
        run(f"{label} matmul [{T}x{mlp}]x[{mlp}x{hidden}] fwd/bwd",
            fwd_bwd(lambda a, b: a @ b.T, rand(T, mlp, seed=3), rand(hidden, mlp, seed=4) * 0.05))
        A, B = rand(16, hidden, seed=5) * 0.05, rand(hidden, 16, seed=6) * 0.05
        run(f"{label} LoRA x@A.T@B.T r16 T={T} fwd/bwd (weight grads: K=T)",
            fwd_bwd(lambda a, b, c: (a @ b.T) @ c.T, x, A, B))
        run(f"{label} output projection [{T}x{hidden}]x[{hidden}x{vocab}] fwd/bwd (K={vocab} in bwd)",
            fwd_bwd(lambda a, e: a @ e.T, x, rand(vocab, hidden, seed=7) * 0.05))
        logits = rand(T, vocab, seed=8)
        targets = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(9))
        run(f"{label} log_softmax [{T}x{vocab}] fwd/bwd", fwd_bwd(lambda a: F.log_softmax(a, -1), logits))
        run(f"{label} cross_entropy sum [{T}x{vocab}] fwd/bwd",
            fwd_bwd(lambda a: F.cross_entropy(a, targets, reduction="sum"), logits))
        run(f"{label} cross_entropy none + chunked_sum [{T}x{vocab}] fwd/bwd",
            fwd_bwd(lambda a: chunked_sum(F.cross_entropy(a, targets, reduction="none")), logits))
        run(f"{label} rmsnorm [{T}x{hidden}] fwd/bwd",
            fwd_bwd(lambda a: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5), x))
        q, k, v = rand(1, heads, T, hd, seed=10), rand(1, kv, T, hd, seed=11), rand(1, kv, T, hd, seed=12)
        rep = heads // kv
        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a, b.repeat_interleave(rep, 1), c.repeat_interleave(rep, 1),
                                                  is_causal=True)
        run(f"{label} sdpa causal [1x{heads}x{T}x{hd}] fwd/bwd", fwd_bwd(sdpa, q, k, v))
        run(f"{label} softmax [{heads}x{T}x{T}] fwd/bwd",
            fwd_bwd(lambda a: torch.softmax(a, -1), rand(heads, T, T, seed=13)))

for n in (9216, 40960, 921600):
    g = rand(n, seed=14)
    run(f"sum() over {n}", lambda: [g.sum()])
    run(f"mean() over {n}", lambda: [g.mean()])
    run(f"chunked_sum over {n}", lambda: [chunked_sum(g)])
    run(f"vector_norm over {n}", lambda: [torch.linalg.vector_norm(g)])
    run(f"grad_norm (chunked) over {n}", lambda: [grad_norm(g, [n])])
    def adam():
        p = torch.nn.Parameter(rand(n, seed=15)); p.grad = g.clone()
        opt = AdamW([p], weight_decay=0.01)
        for _ in range(3):
            opt.step(1e-3)
        return [p, opt.exp_avg[0], opt.exp_avg_sq[0]]
    run(f"AdamW x3 over {n}", adam)
    run(f"clip_grad_norm_ over {n}", lambda: [torch.nn.utils.get_total_norm([g], foreach=False)])

import dataclasses
from reprolora.core import config as cm
for label, folder in (("tiny", tiny_dir), ("135M", base_dir)):
    if not folder:
        continue
    for mb in (1, 4):
        base = cm.load(None)
        config = dataclasses.replace(base, base_model=dataclasses.replace(base.base_model, path=folder),
                                     train=dataclasses.replace(base.train, micro_batch_size=mb, max_steps=2))
        job = train.setup(config)
        trainable = {n: p for n, p in job.peft_model.named_parameters() if p.requires_grad}
        state = train.TrainState(0, trainable, None, [], {})
        state.optimizer = AdamW(list(state.params.values()), weight_decay=0.0)
        job.causal_lm.train()
        run(f"{label} model: gradient of micro-batch 0 (micro_batch_size {mb})",
            lambda: [micro_batch_gradient(job, state, 0, job.plan[0][0])], repeat=1)
print(json.dumps(results))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--profile", default="native")
    parser.add_argument("--base-model", default="", help="the real model's folder (default: the cached default model)")
    parser.add_argument("--tiny-model", default="", help="a tiny model folder (tests/tiny.py makes one)")
    args = parser.parse_args()
    base = args.base_model
    if not base:
        from reprolora.models import base_model

        base = str(base_model.prepare_default())
    runs = {}
    for n in args.threads:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n), args.profile, base, args.tiny_model], capture_output=True, text=True
        )
        if out.returncode != 0:
            sys.exit(f"thread_battery: the {n}-thread run failed:\n{out.stderr[-3000:]}")
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    names = list(runs[args.threads[0]])
    print(f"profile {args.profile}; threads {args.threads}; 'same' = identical bits at every thread count")
    print(f"{'op':<78} {'bits':<8} " + " ".join(f"{n:>3}t ms" for n in args.threads))
    for name in names:
        same = len({runs[n][name]["hash"] for n in args.threads}) == 1
        times = " ".join(f"{runs[n][name]['ms']:8.2f}" for n in args.threads)
        print(f"{name:<78} {'same' if same else 'DIFFER':<8} {times}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
