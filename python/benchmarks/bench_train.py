"""Benchmark: the default job with reprolora under each profile against the HF Trainer + peft doing the same job.

    python python/benchmarks/bench_train.py [--repeats 1] [--threads 2] [--profiles native,...]
                                            [--base-model DIR] [--quick]

Same base model, same tokenized examples, same number of steps, batch size, learning rate and schedule; the
Trainer runs with its defaults (no determinism pins, padded batches of 4). Every run is a fresh process; the
rounds alternate (Trainer, then each profile of pins.PROFILES), so the rows compare on the same machine at the
same time. Rows show the best of --repeats by training time.

Besides times, tokens/s and peak RSS, each row shows achieved GFLOP/s: the job's model FLOPs over the row's
training time, and that as a share of the fp32 matmul ceiling measured here, in this script, at the job's own
matrix shapes. The model FLOPs are the useful work of the job as reprolora runs it, the same number for every
row (the Trainer's padding and its output projection on unlabelled tokens are not counted as useful). For an
example of T tokens of which L are predicted with a label, per example:

    frozen linear (in x out), every decoder layer's:  4*T*in*out     forward, input gradient
    LoRA linears A (in x r) and B (r x out):           6*T*r*(in+out) forward, input gradient, weight gradient
    attention, per layer (H = heads * head dim):       12*T^2*H       Q K^T and P V, forward and backward
                                                                       (the causal mask is not discounted)
    output projection (hidden x vocab):                 4*L*hidden*vocab  forward, input gradient

summed over every example of every step. Every linear's input gradient is counted, though the first layer's
q/k/v inputs need none (about 0.2% of the total). Norms, activations, softmax, dropout and the optimizer are not
counted: they are not matrix products.

The ceiling runs exactly those matrix products (same shapes, same operand layouts: F.linear for the forward,
the weight untransposed for the input gradient, transposed activations for the weight gradient, batched
products for attention) one by one for a sample of the job's examples, under native's pins, each the best of a
few runs; the ceiling is their total FLOPs over their total time, weighted as in the job. It is what MKL does at
these shapes on this machine, not a datasheet number.

It also prints a torch.profiler table of two native training steps (after one warm-up step): the top ops by
self CPU time and their share.

--quick trains the tests' tiny model for 2 steps with one round, to check the script still runs (tests/
test_benchmarks.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from train_ceiling import CEILING_RUNS, CEILING_SAMPLE, best_seconds, example_products, print_analysis  # this folder

from reprolora.core.pins import PROFILES

PROFILE_STEPS = 2


# ---------------------------------------------------------------------------------------------------- children


def job_config(base: str, profile: str, threads: int, max_steps: int) -> Any:
    from reprolora.core import config as config_module

    config = config_module.load(None)
    return dataclasses.replace(
        config,
        profile=profile,
        threads=threads,
        base_model=dataclasses.replace(config.base_model, path=base),
        train=dataclasses.replace(config.train, max_steps=max_steps),
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_reprolora(args: dict[str, Any]) -> dict[str, Any]:
    """`reprolora train` of the job, as the CLI runs it (eval, probes and publishing included in wall time)."""
    start = time.perf_counter()
    from reprolora.core import pins

    pins.apply(args["profile"], args["threads"])
    from reprolora.training import train

    result = train.run(
        job_config(args["base"], args["profile"], args["threads"], args["max_steps"]), Path(args["out"]), progress=False
    )
    tokens = result.metrics.train_tokens
    return {
        "wall_s": time.perf_counter() - start,
        "train_s": tokens / result.tokens_per_second,
        "train_tokens": tokens,
        "steps": result.metrics.steps,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_trainer(args: dict[str, Any]) -> dict[str, Any]:
    """The HF Trainer + peft on the same examples, steps, batch size, learning rate and schedule."""
    start = time.perf_counter()
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from reprolora.data import dataset

    torch.set_num_threads(args["threads"])
    config = job_config(args["base"], "native", args["threads"], args["max_steps"])
    t = config.train
    tokenizer = AutoTokenizer.from_pretrained(args["base"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32)
    data = dataset.load("")
    train_idx, _ = dataset.split(len(data.conversations), config.dataset.eval_fraction, random.Random(config.seed))
    examples = []
    for i in train_idx:
        enc = dataset.tokenize(tokenizer, data.conversations[i], config.dataset.max_seq_len, str(i))
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "attention_mask": [1] * len(enc.input_ids)})
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    steps = -(-len(examples) // (t.batch_size * t.grad_accum)) * t.epochs
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokens = 0

    def counting_collator(features: list[dict]) -> dict:
        nonlocal tokens  # the real tokens trained on, padding not counted
        tokens += sum(len(f["input_ids"]) for f in features)
        return collator(features)

    training = TrainingArguments(
        output_dir=args["out"],
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=args["max_steps"] or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_schedule,
        warmup_steps=max(1, round(t.warmup_ratio * steps)),
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=config.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=counting_collator)
    tick = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - tick
    model.save_pretrained(args["out"])
    return {
        "wall_s": time.perf_counter() - start,
        "train_s": train_s,
        "train_tokens": tokens,
        "steps": output.global_step,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_analysis(args: dict[str, Any]) -> dict[str, Any]:
    """Under native's pins: the job's model FLOPs, the matmul ceiling at its shapes, a profile of training steps."""
    from reprolora.core import pins

    pins.apply("native", args["threads"])
    import torch

    from reprolora.training import distributed, train
    from reprolora.training.step import labelled_tokens, train_step

    job = train.setup(job_config(args["base"], "native", args["threads"], args["max_steps"]))
    model, config = job.causal_lm, job.causal_lm.config
    examples = [i for step in job.plan for micro_batch in step for i in micro_batch]
    sizes = [(len(job.encoded[i].input_ids), labelled_tokens(job.encoded[i])) for i in examples]

    flops: dict[str, float] = {}
    with torch.no_grad():
        for tokens, labelled in sizes:
            for kind, _, product_flops, count in example_products(model, config, tokens, labelled):
                flops[kind] = flops.get(kind, 0.0) + product_flops * count

        # The ceiling: the same products for a sample of the examples spread over their lengths.
        ordered = sorted(sizes)
        sample = [
            ordered[round(j * (len(ordered) - 1) / max(1, CEILING_SAMPLE - 1))]
            for j in range(min(CEILING_SAMPLE, len(ordered)))
        ]
        ceiling_flops = ceiling_seconds = 0.0
        for tokens, labelled in sample:
            for _, make, product_flops, count in example_products(model, config, tokens, labelled):
                ceiling_flops += product_flops * count
                ceiling_seconds += best_seconds(make(), args["ceiling_runs"]) * count

    # Where the time goes: a warm-up step, then a few steps under the profiler.
    state = train.initial_state(job)
    world = distributed.world()
    train_step(job, state, world)
    steps = min(PROFILE_STEPS, job.total_steps - 1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(job, state, world)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = sorted(((e.key, e.self_cpu_time_total, e.count) for e in events), key=lambda e: -e[1])
    return {
        "flops": flops,
        "ceiling_gflops": ceiling_flops / ceiling_seconds / 1e9,
        "ceiling_sample": len(sample),
        "profile_steps": steps,
        "profile_total_s": total_us / 1e6,
        "profile": [
            {"op": name, "self_s": us / 1e6, "share": us / total_us, "calls": calls} for name, us, calls in ops
        ],
    }


CHILDREN = {"reprolora": child_reprolora, "trainer": child_trainer, "analysis": child_analysis}


def run_child(kind: str, **args: Any) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"bench_train: the {kind} run {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- report


COLUMNS = (
    f"{'run':<14} {'wall s':>8} {'train s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'% ceiling':>10} "
    f"{'peak RSS MB':>12} {'steps':>6} {'x Trainer':>10} {'x native':>9}"
)


def row_line(name: str, r: dict, flops: float, ceiling: float, trainer: dict | None, native: dict | None) -> str:
    gflops = flops / r["train_s"] / 1e9

    def ratio(other: dict | None) -> str:
        return f"{r['train_s'] / other['train_s']:.2f}" if other else "-"

    return (
        f"{name:<14} {r['wall_s']:8.1f} {r['train_s']:8.1f} {r['train_tokens'] / r['train_s']:9.0f} "
        f"{gflops:8.1f} {gflops / ceiling:10.1%} {r['peak_rss_mb']:12.0f} {r['steps']:6d} "
        f"{ratio(trainer):>10} {ratio(native):>9}"
    )


def print_rows(rows: dict[str, list[dict]], analysis: dict[str, Any]) -> None:
    """Each run's best round by training time, and the targets."""
    flops = sum(analysis["flops"].values())
    ceiling = analysis["ceiling_gflops"]
    best = {name: min(results, key=lambda r: r["train_s"]) for name, results in rows.items()}
    print(COLUMNS)
    for name, r in best.items():
        print(row_line(name, r, flops, ceiling, best.get("trainer"), best.get("native")))
    print()
    if "trainer" in best and "native" in best:
        print(
            f"native / Trainer training time {best['native']['train_s'] / best['trainer']['train_s']:.2f} "
            f"(target <= 0.6); native at {flops / best['native']['train_s'] / 1e9 / ceiling:.1%} of the ceiling "
            f"(target >= 60%)"
        )
    if "native" in best and "reference" in best:
        ref, native = best["reference"], best["native"]
        print(
            f"reference / native training time R {ref['train_s'] / native['train_s']:.2f} (target <= 2.0, aim 1.5); "
            f"whole run (eval, probes, publishing too) {ref['wall_s'] / native['wall_s']:.2f}"
        )


def prepare_base(args: argparse.Namespace, scratch: Path) -> str:
    if args.quick:
        from reprolora.models import tiny

        return str(tiny.make_model(scratch / "tiny-model"))
    if args.base_model:
        return args.base_model
    return subprocess.run(
        [sys.executable, "-m", "reprolora", "base-model", "prepare"], capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every run, alternating (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-model", default="", help="default: the built-in model, prepared into the cache")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 steps, one round: checks it runs")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="reprolora rows, comma-separated (default: all)")
    args = parser.parse_args()
    max_steps = 2 if args.quick else 0
    profiles = args.profiles.split(",")

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        base = prepare_base(args, scratch)
        common = {"base": base, "threads": args.threads, "max_steps": max_steps}
        analysis = run_child("analysis", **common, ceiling_runs=1 if args.quick else CEILING_RUNS)
        print_analysis(analysis)
        flops = sum(analysis["flops"].values())
        rows: dict[str, list[dict]] = {"trainer": [], **{profile: [] for profile in profiles}}
        print(f"each run as it ends (ceiling {analysis['ceiling_gflops']:.1f} GFLOP/s):\n{COLUMNS}", file=sys.stderr)
        for repeat in range(1 if args.quick else args.repeats):
            for name in rows:
                if name == "trainer":
                    r = run_child("trainer", **common, out=str(scratch / f"trainer{repeat}"))
                else:
                    r = run_child("reprolora", **common, profile=name, out=str(scratch / f"{name}{repeat}"))
                rows[name].append(r)
                # A long run on a shared machine may be cut short: what has ended is already printed.
                print(
                    row_line(
                        name,
                        r,
                        flops,
                        analysis["ceiling_gflops"],
                        (rows["trainer"] or [None])[-1],
                        (rows.get("native") or [None])[-1],
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    print_rows(rows, analysis)


if __name__ == "__main__":
    main()
