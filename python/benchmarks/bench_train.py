"""Benchmark: the default job with reprolora (native and portable) against the HF Trainer + peft doing the same job.

Same base model, same tokenized examples, same number of steps, batch size, learning rate and schedule; the
Trainer runs with its defaults (no determinism pins). Each run is a fresh process, one after another, in this
script, so the numbers compare on the same machine at the same time. Prints wall time, training tokens/s, peak
RSS and the ratios; the targets are native/Trainer <= 1.0 and portable/native <= 1.5 (training time).

    python python/benchmarks/bench_train.py [--repeats 1] [--base-model DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

REPROLORA_RUN = r"""
import json, resource, sys, time
from pathlib import Path
start = time.perf_counter()
from reprolora import config as config_module, pins
import dataclasses
profile, out, base = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = config_module.load(None)
config = dataclasses.replace(config, profile=profile, base_model=dataclasses.replace(config.base_model, path=base))
pins.apply(config.profile, config.threads)
from reprolora import train
result = train.run(config, out, progress=False)
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": result.metrics["train_tokens"] / result.tokens_per_second,
                  "train_tokens": result.metrics["train_tokens"], "steps": result.metrics["steps"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRAINER_RUN = r"""
import json, random, resource, sys, time
from pathlib import Path
start = time.perf_counter()
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
from reprolora import config as config_module, dataset
out, base = sys.argv[1], sys.argv[2]
config = config_module.load(None)
t = config.train
tokenizer = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
data = dataset.load("")
train_idx, _ = dataset.split(len(data.conversations), config.dataset.eval_fraction, random.Random(config.seed))
examples = []
for i in train_idx:
    enc = dataset.tokenize(tokenizer, data.conversations[i], config.dataset.max_seq_len, str(i))
    examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "attention_mask": [1] * len(enc.input_ids)})
model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                         target_modules=config.lora.target_modules, task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                         num_train_epochs=t.epochs, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_schedule,
                         warmup_steps=max(1, round(t.warmup_ratio * 17)), max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=config.seed, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=examples,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
tick = time.perf_counter()
output = trainer.train()
train_s = time.perf_counter() - tick
model.save_pretrained(out)
tokens = sum(len(e["input_ids"]) for e in examples) * t.epochs
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": train_s, "train_tokens": tokens,
                  "steps": output.global_step, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--base-model", default="", help="default: the built-in model, prepared into the cache")
    args = parser.parse_args()
    base = args.base_model or subprocess.run([sys.executable, "-m", "reprolora", "base-model", "prepare"],
                                              capture_output=True, text=True, check=True).stdout.strip()
    rows: dict[str, list[dict]] = {"trainer": [], "native": [], "portable": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            rows["trainer"].append(run(TRAINER_RUN, f"{scratch}/trainer{repeat}", base))
            for profile in ("native", "portable"):
                rows[profile].append(run(REPROLORA_RUN, profile, f"{scratch}/{profile}{repeat}", base))

    def best(name: str, key: str) -> float:
        return min(row[key] for row in rows[name])

    print(f"{'run':<10} {'wall s':>8} {'train s':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'steps':>6}")
    for name, results in rows.items():
        r = min(results, key=lambda row: row["train_s"])
        print(f"{name:<10} {r['wall_s']:8.1f} {r['train_s']:8.1f} {r['train_tokens'] / r['train_s']:9.0f} {r['peak_rss_mb']:12.0f} {r['steps']:6d}")
    print(f"native/trainer   train time {best('native', 'train_s') / best('trainer', 'train_s'):.2f}  wall {best('native', 'wall_s') / best('trainer', 'wall_s'):.2f}  (target <= 1.0)")
    print(f"portable/native  train time {best('portable', 'train_s') / best('native', 'train_s'):.2f}  wall {best('portable', 'wall_s') / best('native', 'wall_s'):.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
