"""The training step, eval loss and golden probes of profile `reference`: the bytes depend on the job alone.

Every number is computed by reprolora.models.reference (forward and backward over reprolora.numerics) and by the
operations below, each defined by mathematics. A step's gradient is the correctly rounded exact sum over every
labelled token of the step: each pass (a micro-batch, on whichever rank owns it) hands back the rows the LoRA
gradients are products of, and one product over all of them, in any order, gives each gradient element. So the
micro-batch size, the world size and the thread count change no bit. Dropout's masks and LoRA's initialisation
come from reprolora.numerics.random, keyed by what they belong to (example, layer, position), not by where that
lies in a batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reprolora.data.dataset import IGNORE, Tokenized
from reprolora.models.reference_layers import Lora, LoraRows, scalar
from reprolora.numerics import random as counter_random
from reprolora.numerics.matmul import matmul
from reprolora.numerics.optim import AdamW, learning_rate
from reprolora.numerics.pointwise import sqrt
from reprolora.numerics.reductions import sum as exact_sum

if TYPE_CHECKING:
    from reprolora.training import distributed
    from reprolora.training.train import Job, TrainState


def initialise_lora(job: Job) -> None:
    """LoRA's initialisation as peft defines it (A uniform in +-1/sqrt(in), B zero), each value of A from the
    counter-based generator keyed by (seed, layer): the same on every machine."""
    with torch.no_grad():
        for lora in job.reference_decoder.loras:
            lora.A.copy_(counter_random.lora_a(job.config.seed, lora.name, tuple(lora.A.shape)))
            lora.B.zero_()


def packed(items: list[Tokenized]) -> tuple[Tensor, list[int], Tensor]:
    """The examples' ids one after another, their lengths, and each row's next-token target (-1: none)."""
    ids, targets = [], []
    for item in items:
        ids.extend(item.input_ids)
        targets.extend(label if label != IGNORE else -1 for label in item.labels[1:])
        targets.append(-1)
    return torch.tensor(ids), [len(item.input_ids) for item in items], torch.tensor(targets)


def dropout_for(job: Job, step: int, examples: list[int], lengths: list[int]) -> Any:
    """The dropout of one pass: each element's mask keyed by (seed, step, example, layer, position, feature)."""
    seed = job.config.seed
    example_of_row = torch.cat([torch.full((n,), e) for e, n in zip(examples, lengths, strict=True)])
    position_of_row = torch.cat([torch.arange(n) for n in lengths])

    def mask(lora: Lora, x: Tensor) -> Tensor:
        return counter_random.dropout_mask(
            lora.dropout, (seed, step, lora.name), example_of_row, position_of_row, x.shape[1]
        )

    return mask


# ---------------------------------------------------------------------------------------------------- the step


def pass_rows(job: Job, step: int, examples: list[int]) -> tuple[Tensor, dict[str, LoraRows]]:
    """One pass over `examples`: per-token losses and every adapted layer's gradient rows."""
    ids, lengths, targets = packed([job.encoded[i] for i in examples])
    return job.reference_decoder.loss_and_backward(ids, lengths, targets, dropout_for(job, step, examples, lengths))


def flatten(losses: Tensor, rows: dict[str, LoraRows], loras: list[Lora]) -> Tensor:
    parts = [losses]
    for lora in loras:
        r = rows[lora.name]
        parts += [r.scaled_dy.reshape(-1), r.u.reshape(-1), r.du.reshape(-1), r.x.reshape(-1)]
    return torch.cat(parts)


def flat_length(tokens: int, labelled: int, loras: list[Lora]) -> int:
    return labelled + tokens * sum(2 * lora.A.shape[0] + lora.B.shape[0] + lora.A.shape[1] for lora in loras)


def unflatten(flat: Tensor, tokens: int, labelled: int, loras: list[Lora]) -> tuple[Tensor, dict[str, LoraRows]]:
    losses, at = flat[:labelled], labelled
    rows = {}
    for lora in loras:
        r, out, width = lora.A.shape[0], lora.B.shape[0], lora.A.shape[1]
        pieces = []
        for columns in (out, r, r, width):
            pieces.append(flat[at : at + tokens * columns].reshape(tokens, columns))
            at += tokens * columns
        rows[lora.name] = LoraRows(*pieces)
    return losses, rows


def gradients(
    loras: list[Lora], passes: list[tuple[Tensor, dict[str, LoraRows]]], labelled: int
) -> tuple[list[Tensor], Tensor]:
    """Each LoRA weight's gradient of the mean loss, and the summed loss: one product over the rows of every
    pass (dB = dy^T u, dA = du^T x, then / tokens), one sum over every token's loss."""
    count = scalar(labelled)
    grads = []
    for lora in loras:
        rows = [pass_[1][lora.name] for pass_ in passes]
        d_b = matmul(torch.cat([r.scaled_dy for r in rows]).t(), torch.cat([r.u for r in rows]))
        d_a = matmul(torch.cat([r.du for r in rows]).t(), torch.cat([r.x for r in rows]))
        grads += [d_a / count, d_b / count]
    return grads, exact_sum(torch.cat([pass_[0] for pass_ in passes]), 0)


def clip(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """g * min(1, max_norm / (norm + 1e-6)), norm = sqrt(sum of every g * g): as clip_grad_norm_ defines it."""
    norm = sqrt(exact_sum(torch.cat([(g * g).reshape(-1) for g in grads]), 0))
    coefficient = torch.clamp(scalar(max_norm) / (norm + scalar(1e-6)), max=1.0)
    return [g * coefficient for g in grads]


def train_step(job: Job, state: TrainState, world: distributed.World) -> None:
    """One optimizer step of profile `reference` (module docstring)."""
    t = job.config.train
    micro_batches = job.plan[state.step]
    loras = job.reference_decoder.loras
    sizes = [
        (sum(len(job.encoded[i].input_ids) for i in examples), sum(labelled(job.encoded[i]) for i in examples))
        for examples in micro_batches
    ]
    with torch.no_grad():
        mine = {
            i: flatten(*pass_rows(job, state.step, examples), loras)
            for i, examples in enumerate(micro_batches)
            if world.owns(i)
        }
        longest = max(flat_length(tokens, n, loras) for tokens, n in sizes)
        padded = {i: torch.nn.functional.pad(v, (0, longest - len(v))) for i, v in mine.items()}
        gathered = world.gather(padded, len(micro_batches), longest)
        passes = [unflatten(flat, tokens, n, loras) for flat, (tokens, n) in zip(gathered, sizes, strict=True)]
        n_tokens = sum(n for _, n in sizes)
        grads, loss_sum = gradients(loras, passes, n_tokens)
        grads = clip(grads, t.max_grad_norm)
        params = [p for lora in loras for p in (lora.A, lora.B)]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
    state.optimizer.step(learning_rate(state.step, job.total_steps, job.warmup, t.learning_rate, t.lr_schedule))
    state.optimizer.zero_grad()
    state.loss_trace.append(float(loss_sum / scalar(n_tokens)))
    state.step += 1


def labelled(item: Tokenized) -> int:
    return sum(1 for label in item.labels[1:] if label != IGNORE)


def optimizer(job: Job, params: dict[str, torch.nn.Parameter]) -> AdamW:
    return AdamW(list(params.values()), weight_decay=job.config.train.weight_decay)


# ---------------------------------------------------------------------------------------------------- the end


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Mean eval loss: the exact sum of every eval token's loss rounded once to float32, over the token count."""
    dec = job.reference_decoder
    size = job.config.train.eval_batch_size
    losses = []
    for first in range(0, len(job.eval_idx), size):
        ids, lengths, targets = packed([job.encoded[i] for i in job.eval_idx[first : first + size]])
        keep = targets >= 0
        h = dec.hidden(ids, lengths)[keep]
        from reprolora.models.reference import cross_entropy

        losses.append(cross_entropy(dec.logits(h), targets[keep])[0])
    every = torch.cat(losses)
    mean = float(exact_sum(every, 0)) / len(every)
    return {"loss": mean, "perplexity": exp_float64(mean), "tokens": len(every)}


def exp_float64(x: float) -> float:
    """e^x rounded to float64 (mpmath at 100 bits, far beyond what float64 rounding needs here), not libm's."""
    import mpmath

    with mpmath.workprec(100):
        return float(mpmath.exp(mpmath.mpf(x)))
