"""The training recipe: one LoRA fine-tune on CPU, from pinned inputs to a published adapter folder.

Reads top to bottom: resolve and hash the inputs, seed, build the model and the adapter, evaluate, train
(AdamW, warmup then decay, gradient clipping and accumulation), evaluate again, decode the golden probes,
write the adapter and its manifest into a temporary folder and rename it into place.
The determinism pins (reprolora.pins) must already be applied: they act when torch is imported.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprolora import __version__, adapter, base_model, dataset, pins
from reprolora.canonical import canonical_json, check_output_target, publish_dir, sha256_bytes
from reprolora.config import Config
from reprolora.dataset import IGNORE, Tokenized
from reprolora.errors import ReproloraError
from reprolora.generate import greedy


@dataclass(frozen=True)
class Result:
    folder: Path
    metrics: dict[str, Any]
    tokens_per_second: float
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_and_tokenizer(folder: Path) -> tuple[Any, Any]:
    """A causal LM in float32 and its tokenizer, from local safetensors only, no custom code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def batches(items: list[Tokenized], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches in the given order."""
    result = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        width = max(len(item.input_ids) for item in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, item in enumerate(chunk):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            mask[row, :n] = 1
        result.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return result


def summed_loss(causal_lm: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the labelled tokens, and their count.

    The output projection runs only on the positions that have a label: on a 49k vocabulary that is a large
    share of the step's work, and prompts carry no labels.
    """
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def evaluate(causal_lm: Any, eval_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    causal_lm.eval()
    total, count = 0.0, 0
    for batch in eval_batches:
        loss, n = summed_loss(causal_lm, batch)
        total += float(loss)
        count += n
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) built from elementwise ops that give the same bits
    on every CPU for a given instruction set.

    torch.optim.AdamW takes its square root from MKL's vector math library on MKL builds of torch, and that
    square root gives different bits on Intel and AMD CPUs, even with MKL_CBWR=COMPATIBLE (measured). rsqrt and
    division are ATen's own kernels, exact IEEE operations.
    """

    def __init__(self, params: list[torch.nn.Parameter], weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2 = 1 - beta2**self.steps
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = param.grad
            param.mul_(1 - lr * self.weight_decay)
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # sqrt(v_hat) as 1 / rsqrt(v_hat); rsqrt(0) = inf gives 0, as sqrt(0) would.
            denom = torch.ones_like(exp_avg_sq).div_(torch.rsqrt(exp_avg_sq / bias_correction2)).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


def learning_rate(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine, linear or constant until `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def toolchain() -> dict[str, str]:
    import peft
    import safetensors
    import transformers

    versions = {
        "python": platform.python_version(),
        "reprolora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    try:
        import tokenizers

        versions["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    return versions


def run(config: Config, out: Path, progress: bool = True) -> Result:
    """Train the adapter described by `config` and publish it at `out` (which must not exist)."""
    started = time.perf_counter()
    check_output_target(out)
    t = config.train

    # Inputs, each hashed before use.
    base = base_model.resolve(config.base_model.path, config.base_model.name)
    data = dataset.load(config.dataset.path)
    rng = random.Random(config.seed)
    train_idx, eval_idx = dataset.split(len(data.conversations), config.dataset.eval_fraction, rng)

    seed_everything(config.seed)
    model, tokenizer = load_model_and_tokenizer(base.folder)
    encoded = [
        dataset.tokenize(tokenizer, messages, config.dataset.max_seq_len, dataset.line_label(data, i))
        for i, messages in enumerate(data.conversations)
    ]
    for module in config.lora.target_modules:
        if not any(name.split(".")[-1] == module for name, _ in model.named_modules()):
            raise ReproloraError(f"lora.target_modules: the base model has no module named {module!r}")

    from peft import LoraConfig, get_peft_model

    seed_everything(config.seed)  # the LoRA init draws from this generator
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=sorted(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    causal_lm = peft_model.get_base_model()

    pad_id = tokenizer.pad_token_id
    eval_batches = batches([encoded[i] for i in eval_idx], t.eval_batch_size, pad_id)
    before = evaluate(causal_lm, eval_batches)

    steps_per_epoch = math.ceil(len(train_idx) / (t.batch_size * t.grad_accum))
    total_steps = steps_per_epoch * t.epochs if t.max_steps == 0 else t.max_steps
    warmup = math.ceil(total_steps * t.warmup_ratio)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, weight_decay=t.weight_decay)

    loss_trace: list[float] = []
    trained_tokens = 0
    train_seconds = 0.0
    from tqdm import tqdm

    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    step = 0
    epoch = 0
    while step < total_steps:
        order = list(train_idx)
        rng.shuffle(order)
        micro = batches([encoded[i] for i in order], t.batch_size, pad_id)
        for first in range(0, len(micro), t.grad_accum):
            if step >= total_steps:
                break
            window = micro[first : first + t.grad_accum]
            tick = time.perf_counter()
            causal_lm.train()
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
            step_loss = 0.0
            for batch in window:
                loss, _ = summed_loss(causal_lm, batch)
                (loss / n_tokens).backward()
                step_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm, foreach=False)
            optimizer.step(learning_rate(step, total_steps, warmup, t.learning_rate, t.lr_schedule))
            optimizer.zero_grad()
            train_seconds += time.perf_counter() - tick
            trained_tokens += sum(int(b["attention_mask"].sum()) for b in window)
            loss_trace.append(step_loss / n_tokens)
            step += 1
            bar.set_postfix(loss=f"{loss_trace[-1]:.4f}", tok_s=f"{trained_tokens / train_seconds:.0f}", epoch=epoch)
            bar.update(1)
        epoch += 1
    bar.close()

    after = evaluate(causal_lm, eval_batches)
    causal_lm.eval()
    probes = []
    for prompt in config.probes.prompts:
        completion = greedy(causal_lm, tokenizer, prompt, config.probes.max_new_tokens)
        probes.append({
            "prompt": prompt,
            "token_ids": completion.token_ids,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "logits_sha256": completion.logits_sha256,
        })

    metrics = {
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_perplexity_before": before["perplexity"],
        "eval_perplexity_after": after["perplexity"],
        "eval_tokens": before["tokens"],
        "train_examples": len(train_idx),
        "eval_examples": len(eval_idx),
        "steps": step,
        "epochs": epoch,
        "train_tokens": trained_tokens,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    resolved = config.to_dict()
    # The manifest names inputs by content, never by path.
    resolved["base_model"] = {"name": base.name}
    resolved["dataset"] = {**resolved["dataset"], "path": data.name}
    body = {
        "inputs": {
            "base_model": {"name": base.name, "files": base.hashes},
            "dataset": {"name": data.name, "sha256": data.sha256, "examples": len(data.conversations),
                        "train_indices": train_idx, "eval_indices": eval_idx},
            "config": resolved,
        },
        "toolchain": toolchain(),
        "pins": pins.describe(),
        "metrics": metrics,
        "loss_trace": loss_trace,
        "loss_trace_sha256": sha256_bytes(canonical_json(loss_trace)),
        "probes": {"max_new_tokens": config.probes.max_new_tokens, "results": probes},
    }
    with publish_dir(out) as staging:
        adapter.write_adapter(peft_model, staging, base.name)
        adapter.write_manifest(staging, body)
    return Result(out, metrics, trained_tokens / max(train_seconds, 1e-9), time.perf_counter() - started)
