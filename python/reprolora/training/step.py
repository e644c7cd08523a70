"""One optimizer step of the training recipe (reprolora.training.train): a function of the training state and the
micro-batches the plan gives it, nothing else.

The unit of work is the micro-batch (`train.micro_batch_size` examples, one forward and backward pass). A step
takes `batch_size * grad_accum` examples; each micro-batch's gradient is computed on its own, with dropout drawn
from a generator seeded by (seed, step, micro-batch), and the gradients are added in micro-batch order. That is
what makes the bytes the same on any number of processes (reprolora.training.distributed) and after a resume
(reprolora.training.checkpoint): neither changes what a micro-batch computes nor the order of the sum.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from reprolora.data.dataset import IGNORE, Tokenized
from reprolora.training import distributed, reference
from reprolora.training.optim import learning_rate

if TYPE_CHECKING:
    from reprolora.training.train import Job, TrainState

# No reduction in the step sums more elements than this at once: ATen splits a reduction over 32,768 elements
# or more between threads, and the split changes the bits with the thread count.
REDUCTION_CHUNK = 16384


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch, as wide as its longest example."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def labelled_tokens(item: Tokenized) -> int:
    """Tokens that are predicted with a label (the first token is never predicted)."""
    return sum(1 for label in item.labels[1:] if label != IGNORE)


def chunked_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in fixed chunks, in order: the same bits whatever the thread count."""
    parts = values.split(REDUCTION_CHUNK)
    if len(parts) == 1:
        return values.sum()
    return torch.stack([part.sum() for part in parts]).sum()


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
    per_token = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    return chunked_sum(per_token), int(keep.sum())


def dropout_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of dropout's generator for one micro-batch: the same on any rank, after any resume."""
    digest = hashlib.sha256(f"reprolora-dropout/{seed}/{step}/{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def micro_batch_gradient(job: Job, state: TrainState, index: int, examples: list[int]) -> torch.Tensor:
    """The gradient of one micro-batch's summed loss, flattened in parameter order, with that loss appended."""
    torch.manual_seed(dropout_seed(job.config.seed, state.step, index))  # LoRA dropout draws from this generator
    batch = collate([job.encoded[i] for i in examples], job.tokenizer.pad_token_id)
    loss, _ = summed_loss(job.causal_lm, batch)
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in state.params.values()] + [loss.detach().reshape(1)])
    state.optimizer.zero_grad()
    return flat


def fold(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the micro-batches' vectors, added one by one in micro-batch order."""
    total = vectors[0].clone()
    for vector in vectors[1:]:
        total.add_(vector)
    return total


def grad_norm(flat_grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The global L2 norm as clip_grad_norm_ computes it (the norm of the per-tensor norms), each tensor's norm
    taken over fixed chunks. torch 2.13's vector_norm measured thread-invariant here even without the chunks;
    they keep the bits independent of how a future kernel splits a long reduction."""
    norms = []
    for grad in flat_grad.split(sizes):
        chunks = grad.split(REDUCTION_CHUNK)
        norms.append(
            torch.linalg.vector_norm(chunks[0])
            if len(chunks) == 1
            else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c) for c in chunks]))
        )
    return torch.linalg.vector_norm(torch.stack(norms))


def train_step(job: Job, state: TrainState, world: distributed.World) -> None:
    """One optimizer step: each process computes the gradients of its share of the micro-batches, every process
    receives all of them, adds them in micro-batch order, clips, and updates its copy of the adapter."""
    if job.config.profile == "reference":
        return reference.train_step(job, state, world)
    t = job.config.train
    micro_batches = job.plan[state.step]
    job.causal_lm.train()
    mine = {
        i: micro_batch_gradient(job, state, i, examples) for i, examples in enumerate(micro_batches) if world.owns(i)
    }
    vectors = world.gather(mine, len(micro_batches), sum(p.numel() for p in state.params.values()) + 1)
    n_tokens = sum(labelled_tokens(job.encoded[i]) for examples in micro_batches for i in examples)

    with torch.no_grad():
        grad = fold(vectors)[:-1].div_(n_tokens)
        sizes = [p.numel() for p in state.params.values()]
        scale = torch.clamp(t.max_grad_norm / (grad_norm(grad, sizes) + 1e-6), max=1.0)
        grad.mul_(scale)
        for param, param_grad in zip(state.params.values(), grad.split(sizes), strict=True):
            param.grad = param_grad.view_as(param)
    state.optimizer.step(learning_rate(state.step, job.total_steps, job.warmup, t.learning_rate, t.lr_schedule))
    state.optimizer.zero_grad()
    state.loss_trace.append(sum(float(vector[-1]) for vector in vectors) / n_tokens)
    state.step += 1
