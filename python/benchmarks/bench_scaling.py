"""Benchmark: how a training step scales with model size, and the default job on one process against two.

Every row is a fresh `reprolora train` process, run one after another by this script, so the rows compare on the
same machine at the same time (compare ratios, not absolute numbers, on a shared machine):

  tiny     the tests' tiny random Llama (tests/tiny.py, 2 layers of width 32, byte tokenizer)
  135M     the default model, SmolLM2-135M-Instruct
  360M     a random Llama of SmolLM2-360M's shape (hidden 960, 32 layers, 15 heads, 5 key/value heads,
           intermediate 2560, vocabulary 49152: 362M parameters), built here from a config with the default
           model's tokenizer
           -- these three train the default job (dataset, config) cut to --steps steps
  ws1      the whole default job, world size 1 with 2 threads
  ws2      the same job launched by torchrun, world size 2 with 1 thread each (needs reprolora's data parallelism)

Step time and tokens/s are reprolora's own (training steps only; the first step's warm-up included), peak RSS is
that of the largest process, wall time covers loading too. For ws1/ws2 it also says whether the adapter bytes agree.

    python python/benchmarks/bench_scaling.py [--steps 4] [--rows tiny,135M,360M,ws] [--base-model DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs a command, then prints the peak RSS of its largest process (children only: this wrapper is not counted).
MEASURE = r"""
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": code, "peak_rss_mb": peak_rss_mb}), file=sys.stderr)
"""

# SmolLM2-360M's shape (its config.json), with random weights: the benchmark needs its size, not its knowledge.
BUILD_360M = r"""
import shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
tokenizer_from, folder = Path(sys.argv[1]), Path(sys.argv[2])
folder.mkdir(parents=True)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tokenizer_from / name).exists():
        shutil.copy(tokenizer_from / name, folder / name)
config = LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                     num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.save_pretrained(folder, safe_serialization=True)
"""

RESULT_LINE = re.compile(r"\| (\d+) steps, ([\d.]+) tokens/s, ([\d.]+) s")


def train(name: str, launcher: list[str], config: Path, out: Path, base: Path) -> dict:
    """One `reprolora train` in a fresh process (or processes, under torchrun), measured."""
    command = [*launcher, "train", "-q", "-c", str(config), "--base-model", str(base), "-o", str(out)]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    measured = json.loads(result.stderr.strip().splitlines()[-1])
    found = RESULT_LINE.search(result.stdout)
    if measured["rc"] != 0 or not found:
        sys.exit(
            f"benchmark row {name} failed (exit {measured['rc']}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    manifest = json.loads((out / "manifest.json").read_text())
    steps, tokens_per_s = int(found.group(1)), float(found.group(2))
    train_tokens = manifest["metrics"]["train_tokens"]
    return {
        "name": name,
        "steps": steps,
        "tokens_per_s": tokens_per_s,
        "train_tokens": train_tokens,
        "step_s": train_tokens / tokens_per_s / steps,
        "wall_s": wall,
        "peak_rss_mb": measured["peak_rss_mb"],
        "adapter_sha256": hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest(),
    }


def write_config(path: Path, threads: int, steps: int = 0) -> Path:
    """The default job with `threads` threads per process, cut to `steps` steps (0: all of them)."""
    path.write_text(f"threads = {threads}\n" + (f"[train]\nmax_steps = {steps}\n" if steps else ""))
    return path


HEADER = (
    f"{'run':<6} {'steps':>5} {'step s':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'wall s':>8} {'step time ratio':>16}"
)


def print_row(r: dict, reference: dict) -> None:
    """One row as soon as it is measured (a shared machine can be slow: what was measured is not lost)."""
    print(
        f"{r['name']:<6} {r['steps']:5d} {r['step_s']:8.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
        f"{r['wall_s']:8.1f} {r['step_s'] / reference['step_s']:16.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps of the tiny, 135M and 360M rows")
    parser.add_argument(
        "--rows", default="tiny,135M,360M,ws", help="which rows, of tiny, 135M, 360M, ws (default: all)"
    )
    parser.add_argument("--base-model", default="", help="default: the built-in model, prepared into the cache")
    args = parser.parse_args()
    rows = args.rows.split(",")
    base = Path(
        args.base_model
        or subprocess.run(
            [sys.executable, "-m", "reprolora", "base-model", "prepare"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    reprolora = [sys.executable, "-m", "reprolora"]
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        cut = write_config(scratch / "cut.toml", threads=2, steps=args.steps)
        if {"tiny", "135M", "360M"} & set(rows):
            print(
                f"Model size: the default job cut to {args.steps} steps, 2 threads; "
                "step time ratio against the first row"
            )
            print(HEADER, flush=True)
        reference = None
        for name in ("tiny", "135M", "360M"):
            if name not in rows:
                continue
            if name == "tiny":
                sys.path.insert(0, str(REPO / "tests"))
                import tiny

                model = tiny.make_model(scratch / "tiny")
            elif name == "135M":
                model = base
            else:
                model = scratch / "360m"
                built = subprocess.run(
                    [sys.executable, "-c", BUILD_360M, str(base), str(model)], capture_output=True, text=True
                )
                if built.returncode != 0:
                    sys.exit(f"building the 360M model failed:\n{built.stderr[-3000:]}")
            row = train(name, reprolora, cut, scratch / f"out-{name}", model)
            reference = reference or row
            print_row(row, reference)

        if "ws" not in rows:
            return
        if importlib.util.find_spec("reprolora.training.distributed") is None:
            print(
                "\nWorld size 1 against 2: left out, this reprolora has no data parallelism "
                "(reprolora.training.distributed)"
            )
            return
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "reprolora",
        ]
        print("\nThe whole default job: world size 1 x 2 threads against world size 2 x 1 thread (torchrun)")
        print(HEADER, flush=True)
        ws1 = train("ws1", reprolora, write_config(scratch / "ws1.toml", threads=2), scratch / "out-ws1", base)
        print_row(ws1, ws1)
        ws2 = train("ws2", torchrun, write_config(scratch / "ws2.toml", threads=1), scratch / "out-ws2", base)
        print_row(ws2, ws1)
        print(
            f"ws2/ws1: step time {ws2['step_s'] / ws1['step_s']:.2f}, wall {ws2['wall_s'] / ws1['wall_s']:.2f}, "
            f"peak RSS per process {ws2['peak_rss_mb'] / ws1['peak_rss_mb']:.2f}; adapter bytes "
            f"{'identical' if ws1['adapter_sha256'] == ws2['adapter_sha256'] else 'differ'}"
        )


if __name__ == "__main__":
    main()
