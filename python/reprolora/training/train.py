"""The training recipe: one LoRA fine-tune on CPU, from pinned inputs to a published adapter folder.

Reads top to bottom:
- setup: resolve and hash the inputs, build the model and its adapter, plan every step's micro-batches;
- the loop: steps (each one reprolora.training.step.train_step), checkpoints, progress;
- the end: eval, golden probes, the manifest, and the folder published atomically.

The plan fixes every step's micro-batches, and the step adds their gradients in micro-batch order: that is what
makes the bytes the same on any number of processes and after a resume (reprolora.training.step says how).
The determinism pins (reprolora.core.pins) must already be applied: they act when torch is imported.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprolora.audit import card
from reprolora.core import adapter, manifest, pins
from reprolora.core.canonical import canonical_json, check_output_target, publish_dir, sha256_bytes
from reprolora.core.config import Config
from reprolora.data import dataset
from reprolora.data.dataset import Tokenized
from reprolora.decoding.generate import engine_for, greedy
from reprolora.models import base_model, families
from reprolora.models.loading import load_model_and_tokenizer, toolchain
from reprolora.models.reference import Decoder
from reprolora.training import checkpoint, distributed, reference
from reprolora.training.optim import AdamW
from reprolora.training.step import collate, summed_loss, train_step


@dataclass(frozen=True)
class Result:
    folder: Path
    metrics: manifest.Metrics
    tokens_per_second: float
    seconds: float


# ---------------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Job:
    """What training reads and never changes: the inputs, the model with its adapter, and the plan of every step."""

    config: Config
    base: base_model.BaseModel
    data: dataset.Dataset
    train_idx: list[int]
    eval_idx: list[int]
    encoded: list[Tokenized]
    tokenizer: Any
    peft_model: Any
    plan: list[list[list[int]]]  # step -> micro-batch -> example indices
    epoch_of_step: list[int]
    warmup: int
    identity: manifest.Identity

    @property
    def causal_lm(self) -> Any:
        return self.peft_model.get_base_model()

    @functools.cached_property
    def reference_decoder(self) -> Decoder:
        """Profile `reference`'s decoder over the model (reprolora.training.reference), built on first use and kept:
        it holds the base weights' transposes and the rotary table, and the adapter's own LoRA tensors."""
        return Decoder(self.peft_model)

    @property
    def total_steps(self) -> int:
        return len(self.plan)


def identity(
    config: Config, base: base_model.BaseModel, data: dataset.Dataset, train_idx: list[int], eval_idx: list[int]
) -> manifest.Identity:
    """What fixes the bytes of a job: its inputs by content, its config, the toolchain and the pins. The manifest
    records it; a checkpoint must match it to be resumed."""
    resolved = config.to_dict()
    # The manifest names inputs by content, never by path.
    resolved["base_model"] = {"name": base.name}
    resolved["dataset"] = {**resolved["dataset"], "path": data.name}
    inputs = manifest.Inputs(
        manifest.BaseModel(base.name, base.hashes),
        manifest.Dataset(data.name, data.sha256, len(data.conversations), train_idx, eval_idx),
        resolved,
    )
    return manifest.Identity(inputs, toolchain(), manifest.pins_from_dict(pins.describe()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(train_idx: list[int], rng: random.Random, config: Config) -> tuple[list[list[list[int]]], list[int]]:
    """The micro-batches of every step, and the epoch of each step: a seeded shuffle per epoch, cut into steps of
    batch_size * grad_accum examples (the last step of an epoch may be short), each cut into micro-batches."""
    t = config.train
    per_step = t.batch_size * t.grad_accum
    steps_per_epoch = math.ceil(len(train_idx) / per_step)
    total = steps_per_epoch * t.epochs if t.max_steps == 0 else t.max_steps
    plan: list[list[list[int]]] = []
    epochs: list[int] = []
    epoch = 0
    while len(plan) < total:
        order = list(train_idx)
        rng.shuffle(order)
        for first in range(0, len(order), per_step):
            if len(plan) == total:
                break
            examples = order[first : first + per_step]
            plan.append([examples[i : i + t.micro_batch_size] for i in range(0, len(examples), t.micro_batch_size)])
            epochs.append(epoch)
        epoch += 1
    return plan, epochs


def setup(config: Config) -> Job:
    """Resolve and hash the inputs, tokenize, build the model with its LoRA adapter (seeded), plan the steps."""
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
    config = families.resolve(config, model)  # a preset becomes this model's module names, each checked

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
    plan, epoch_of_step = plan_steps(train_idx, rng, config)
    warmup = math.ceil(len(plan) * config.train.warmup_ratio)
    job = Job(
        config,
        base,
        data,
        train_idx,
        eval_idx,
        encoded,
        tokenizer,
        peft_model,
        plan,
        epoch_of_step,
        warmup,
        identity(config, base, data, train_idx, eval_idx),
    )
    if config.profile == "reference":
        reference.initialise_lora(job)  # torch's generator draws differently per build and CPU
    return job


@dataclass
class TrainState:
    """Everything training changes. The step maps it to the next one; a checkpoint holds exactly this.

    No random generator is carried from step to step: dropout's is seeded from (seed, step, micro-batch) and the
    data order is the plan, fixed at setup. So `step` is the whole of the RNG state and the data position."""

    step: int  # optimizer steps done
    params: dict[str, torch.nn.Parameter]  # the adapter's trainable weights, by name (the model's own tensors)
    optimizer: AdamW  # AdamW's moments and step count
    loss_trace: list[float]  # mean loss per labelled token of every step done
    eval_before: dict[str, float]  # eval loss of the untrained adapter, for the manifest


def initial_state(job: Job) -> TrainState:
    """Step 0: the adapter as get_peft_model initialised it, zero moments, no eval yet."""
    params = {name: p for name, p in job.peft_model.named_parameters() if p.requires_grad}
    if job.config.profile == "reference":
        optimizer = reference.optimizer(job, params)
    else:
        optimizer = AdamW(list(params.values()), weight_decay=job.config.train.weight_decay)
    return TrainState(0, params, optimizer, [], {})


# ---------------------------------------------------------------------------------------------------- the loop


def step_tokens(job: Job, step: int) -> int:
    return sum(len(job.encoded[i].input_ids) for examples in job.plan[step] for i in examples)


def train(
    job: Job, state: TrainState, world: distributed.World, progress: bool, checkpoints: Path, checkpoint_every: int
) -> float:
    """Steps from `state.step` to the end of the plan, a checkpoint every `checkpoint_every` steps (0: none);
    returns the tokens per second of the steps this process ran (after a resume, only those since it)."""
    from tqdm import tqdm

    bar = tqdm(
        total=job.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=not (progress and world.is_main),
        dynamic_ncols=True,
    )
    seconds, tokens = 0.0, 0
    while state.step < job.total_steps:
        tick = time.perf_counter()
        tokens += step_tokens(job, state.step)
        train_step(job, state, world)
        seconds += time.perf_counter() - tick
        bar.set_postfix(
            loss=f"{state.loss_trace[-1]:.4f}", tok_s=f"{tokens / seconds:.0f}", epoch=job.epoch_of_step[state.step - 1]
        )
        bar.update(1)
        if checkpoint_every and state.step % checkpoint_every == 0 and state.step < job.total_steps and world.is_main:
            checkpoint.save(checkpoints, job.identity.to_dict(), state)
    bar.close()
    return tokens / max(seconds, 1e-9)


# ---------------------------------------------------------------------------------------------------- the end


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    if job.config.profile == "reference":
        return reference.evaluate(job)
    causal_lm = job.causal_lm
    causal_lm.eval()
    pad_id = job.tokenizer.pad_token_id
    size = job.config.train.eval_batch_size
    total, count = 0.0, 0
    for first in range(0, len(job.eval_idx), size):
        loss, n = summed_loss(causal_lm, collate([job.encoded[i] for i in job.eval_idx[first : first + size]], pad_id))
        total += float(loss)
        count += n
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


def golden_probes(job: Job) -> manifest.Probes:
    job.causal_lm.eval()
    engine = engine_for(job.causal_lm, job.tokenizer)
    results = []
    for prompt in job.config.probes.prompts:
        completion = greedy(engine, prompt, job.config.probes.max_new_tokens)
        results.append(
            manifest.Probe(
                prompt, completion.token_ids, completion.text, completion.finish_reason, completion.logits_sha256
            )
        )
    return manifest.Probes(job.config.probes.max_new_tokens, results)


def manifest_body(job: Job, state: TrainState, after: dict[str, float], probes: manifest.Probes) -> manifest.Manifest:
    before = state.eval_before
    metrics = manifest.Metrics(
        eval_loss_before=before["loss"],
        eval_loss_after=after["loss"],
        eval_perplexity_before=before["perplexity"],
        eval_perplexity_after=after["perplexity"],
        eval_tokens=before["tokens"],
        train_examples=len(job.train_idx),
        eval_examples=len(job.eval_idx),
        steps=state.step,
        epochs=job.epoch_of_step[-1] + 1,
        train_tokens=sum(step_tokens(job, step) for step in range(state.step)),
        trainable_parameters=sum(p.numel() for p in state.params.values()),
    )
    return manifest.Manifest(
        {},
        job.identity.inputs,
        job.identity.toolchain,
        job.identity.pins,
        metrics,
        state.loss_trace,
        sha256_bytes(canonical_json(state.loss_trace)),
        probes,
    )


def weights_sha256(state: TrainState) -> str:
    digest = hashlib.sha256()
    for name, param in state.params.items():
        digest.update(name.encode())
        digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def start(job: Job, out: Path, resume: bool) -> TrainState:
    """The state to train from: the newest checkpoint of this job with `resume`, else step 0."""
    state = initial_state(job)
    latest = checkpoint.newest(checkpoint.folder_for(out)) if resume else None
    if latest is not None:
        checkpoint.load(latest, job.identity.to_dict(), state)
        print(f"reprolora: resuming from {latest} (step {state.step} of {job.total_steps})", file=sys.stderr)
    else:
        if resume:
            print(f"reprolora: no checkpoint in {checkpoint.folder_for(out)}; starting at step 0", file=sys.stderr)
        state.eval_before = evaluate(job)
    return state


def run(
    config: Config, out: Path, progress: bool = True, checkpoint_every: int = 0, resume: bool = False
) -> Result | None:
    """Train the adapter described by `config` and publish it at `out` (which must not exist).

    Under torchrun every rank trains; rank 0 alone publishes, once every rank has shown that it holds the same
    weights. Other ranks return None."""
    started = time.perf_counter()
    check_output_target(out)
    world = distributed.world()
    try:
        job = setup(config)
        state = start(job, out, resume)
        distributed.check_same(world, "the step to start from", str(state.step))
        tokens_per_second = train(job, state, world, progress, checkpoint.folder_for(out), checkpoint_every)
        distributed.check_same(world, "the sha256 of the trained weights", weights_sha256(state))
        if not world.is_main:
            return None
        after = evaluate(job)
        body = manifest_body(job, state, after, golden_probes(job))
        with publish_dir(out) as staging:
            adapter.write_adapter(job.peft_model, staging, job.base.name)
            card.write_card(staging, body)
            manifest.write(staging, body)
    finally:
        world.close()
    return Result(out, body.metrics, tokens_per_second, time.perf_counter() - started)
