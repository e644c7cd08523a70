"""Greedy decoding that gives the same bits whatever else is decoded with it: the one engine behind training's
golden probes, `infer`, `serve` and `merge`'s check.

Why the answers do not depend on the load:
- every decoding step runs SLOTS rows (idle slots padded), so each matrix product has the same shape whether one
  request is decoding or SLOTS are: a BLAS picks its kernel (and so its rounding) by shape, and a row of a product
  does not depend on the values in the other rows;
- the products themselves (reprolora.decoding.kernels) give the same bits at any thread count: the narrow ones
  summed by ATen, the wider ones by oneDNN over packed weights;
- a request's prompt is run alone (prefill): its shapes depend on that request only;
- attention is per request: its query against its own key/value cache, so no other request's data (nor its length,
  nor padding) enters its arithmetic;
- rotary tables are computed in fixed chunks of positions, so a position's angle never depends on the total length.

Rows that no request needs carry guesses (reprolora.decoding.guesses: prompt lookup): the tokens that followed the
latest earlier occurrence of a request's last few tokens, each at the next position of that request. A guess's row
is computed exactly as the row of the step that would decode that position (the same product rows, its query against
its own cache up to that position), so where the guess equals the token the previous row chose, that row's logits
are the ones the next step would have produced, and the next token is taken from them: several tokens in one step,
the same bits and tokens as one token a step. A wrong guess costs nothing but its row, which was idle; its cache
entries lie past the request's length and are overwritten.

The model forward is written out over the Hugging Face modules of the model (embedding, norms, projections, MLP,
output head), found where the family's DecoderLayout says (reprolora.models.families) and called as they are, except
the linear layers (kernels.linear: a PEFT LoRA layer is its base layer plus lora_B(x A^T) * scaling, as PEFT
computes it). The output head runs on the prompt's last position only.

Stop strings are checked as the answer grows, decoding its last few tokens only (reprolora.decoding.stops).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from reprolora.core import pins
from reprolora.data.dataset import Messages, prompt_ids
from reprolora.decoding.forward import Forward
from reprolora.decoding.guesses import lookup, share_idle_rows
from reprolora.decoding.stops import AnswerText, cut

SLOTS = 8  # rows of every decoding step: every product of a step has this many rows, whatever the load
BLOCK = 64  # positions per key/value cache block: caches grow by whole blocks, never copied per token


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token excluded
    text: str
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    logits_sha256: str  # sha256 of the float32 logits of every decoding step, in order


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


@dataclass
class Sequence:
    """One request being decoded: its ids, its key/value cache and what it has produced so far."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: list[str]
    on_token: Callable[[list[int]], None] | None
    generated: list[int] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions in the cache
    finish: str | None = None  # set once decoding has ended
    text: str = ""
    answer: AnswerText | None = None  # the text so far, where stop strings are looked for

    @property
    def done(self) -> bool:
        return self.finish is not None

    def completion(self) -> Completion:
        return Completion(
            self.prompt_ids, list(self.generated), self.text, self.finish or "length", self.digest.hexdigest()
        )


class Engine:
    """The batch-invariant decoder over one causal LM (a PeftModel's model, or a plain or merged one).

    It holds what it builds as it decodes (the rotary table, the packed weights): keep one per model."""

    def __init__(self, model: Any, tokenizer: Any, guess: bool = True) -> None:
        if hasattr(model, "get_base_model"):  # a PeftModel: decode with the model inside, as training does
            model = model.get_base_model()
        self.model, self.tokenizer = model, tokenizer
        self.eos = stop_token_ids(tokenizer, model)
        self.forward = Forward(model)
        self.kv_heads, self.head_dim = self.forward.kv_heads, self.forward.head_dim  # of the key/value caches
        self.guess = guess  # idle rows carry guessed tokens (module docstring); False: one token a step
        self.steps = 0  # decoding steps run (each SLOTS rows)
        self.rows = 0  # requests decoded over those steps
        self.guessed = 0  # rows that carried a guess
        self.accepted = 0  # guesses that were right: tokens decoded beyond one per request and step

    # ----------------------------------------------------------------------------------------- the public API

    def start(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop: list[str] | None = None,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> Sequence:
        """A new sequence with its prompt run (alone) and its first token chosen; it may be done already."""
        sequence = Sequence(list(ids), max_new_tokens, list(stop or []), on_token)
        if sequence.stop:
            sequence.answer = AnswerText(self.tokenizer, sequence.stop)
        if max_new_tokens < 1:
            sequence.finish = "length"
            return sequence
        with torch.inference_mode():
            logits = self._prefill(sequence)
        self._take(sequence, logits[0])
        return sequence

    def step(self, sequences: list[Sequence]) -> None:
        """At least one token more for each sequence (at most SLOTS, none done), computed in one fixed-shape step;
        more where the guesses in the idle rows were right."""
        if not 0 < len(sequences) <= SLOTS or any(s.done for s in sequences):
            raise ValueError(f"step takes 1 to {SLOTS} sequences that are not done")
        guessing = self.guess and len(sequences) < SLOTS  # no lookups where no row is idle (a full batch)
        found = [
            lookup(s.prompt_ids + s.generated, min(SLOTS - 1, s.max_new_tokens - len(s.generated) - 1))
            if guessing
            else []
            for s in sequences
        ]
        guesses = share_idle_rows(found, SLOTS)
        rows = [
            (sequence, token, sequence.length + offset)
            for sequence, guessed in zip(sequences, guesses, strict=True)
            for offset, token in enumerate([sequence.generated[-1], *guessed])
        ]
        with torch.inference_mode():
            logits = self._decode(rows)
        self.steps += 1
        self.rows += len(sequences)
        self.guessed += len(rows) - len(sequences)
        row = 0
        for sequence, guessed in zip(sequences, guesses, strict=True):
            for offset in range(len(guessed) + 1):  # row offset's input token is now known right: it stays cached
                self._take(sequence, logits[row + offset])
                sequence.length += 1
                if sequence.done or offset == len(guessed) or sequence.generated[-1] != guessed[offset]:
                    break
                self.accepted += 1
            row += len(guessed) + 1

    # ----------------------------------------------------------------------------------------- choosing tokens

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        logits = logits.float()
        sequence.digest.update(logits.numpy().tobytes())
        token = int(torch.argmax(logits))
        if token in self.eos:
            self._finish(sequence, "stop")
            return
        sequence.generated.append(token)
        if sequence.on_token is not None:
            sequence.on_token(sequence.generated)
        if sequence.answer is not None:
            sequence.answer.update(sequence.generated)
        if sequence.answer is not None and sequence.answer.has_stop:
            self._finish(sequence, "stop")
        elif len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        text = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
        sequence.finish, sequence.text = reason, cut(text, sequence.stop)
        sequence.keys, sequence.values = [], []  # free the cache

    # ----------------------------------------------------------------------------------------- the steps

    def _store(self, sequence: Sequence, index: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        """Write k, v [n, kv_heads, d] at positions at.. of the sequence's cache, growing it by whole blocks."""
        end = at + k.shape[0]
        if index == len(sequence.keys):
            capacity = -(-end // BLOCK) * BLOCK
            sequence.keys.append(torch.empty(self.kv_heads, capacity, self.head_dim))
            sequence.values.append(torch.empty(self.kv_heads, capacity, self.head_dim))
        elif end > sequence.keys[index].shape[1]:
            for cache in (sequence.keys, sequence.values):
                grown = torch.empty(self.kv_heads, -(-end // BLOCK) * BLOCK, self.head_dim)
                grown[:, :at] = cache[index][:, :at]
                cache[index] = grown
        sequence.keys[index][:, at:end] = k.transpose(0, 1)
        sequence.values[index][:, at:end] = v.transpose(0, 1)

    def _prefill(self, sequence: Sequence) -> torch.Tensor:
        """The prompt alone through the model; its caches filled; the last position's logits [1, vocab]."""
        n = len(sequence.prompt_ids)
        positions = torch.arange(n)
        forward = self.forward
        x = forward.embed_rows(torch.tensor(sequence.prompt_ids, dtype=torch.long), positions)
        cos, sin = forward.rotary_rows(positions)
        # [query, key]: a key at or before its query, and within the window; one mask per window size
        allowed = {
            window: (positions.unsqueeze(0) <= positions.unsqueeze(1))
            & (positions.unsqueeze(0) > positions.unsqueeze(1) - window)
            for window in set(forward.windows)
            if window is not None
        }

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._store(sequence, index, k, v, 0)
            window = forward.windows[index]
            if window is None:
                return forward.attention(index, q, k.transpose(0, 1), v.transpose(0, 1), None, causal=True)
            return forward.attention(index, q, k.transpose(0, 1), v.transpose(0, 1), allowed[window])

        for index in range(len(forward.layers)):
            x = forward.layer(index, x, attend, cos, sin)
        sequence.length = n
        return forward.logits(x[-1:])

    def _decode(self, rows: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Logits [SLOTS, vocab] of `rows` (sequence, input token, its position), in SLOTS rows (the rest padding).
        A sequence's rows are at consecutive positions from its length on, in order: each row's key and value are
        cached before the next row's query reads them."""
        padding = SLOTS - len(rows)  # whatever the load: the products' shapes, and so their bits, never change
        tokens = [token for _, token, _ in rows] + [0] * padding
        positions = torch.tensor([at for _, _, at in rows] + [0] * padding)
        forward = self.forward
        x = forward.embed_rows(torch.tensor(tokens, dtype=torch.long), positions)
        cos, sin = forward.rotary_rows(positions)
        starts = [row for row in range(len(rows)) if row == 0 or rows[row][0] is not rows[row - 1][0]]
        spans = list(zip(starts, starts[1:] + [len(rows)], strict=True))  # each sequence's rows

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for start, end in spans:  # a sequence's rows into its cache at once: a row reads none past its own
                self._store(rows[start][0], index, k[start:end], v[start:end], rows[start][2])
            window = forward.windows[index]
            outs = []
            for row, (sequence, _, at) in enumerate(rows):
                first = max(0, at + 1 - window) if window is not None else 0
                outs.append(
                    forward.attention(
                        index,
                        q[row : row + 1],
                        sequence.keys[index][:, first : at + 1],
                        sequence.values[index][:, first : at + 1],
                        None,
                    )
                )
            outs.append(torch.zeros_like(q[len(rows) :]))  # padding rows attend to nothing
            return torch.cat(outs)

        for index in range(len(forward.layers)):
            x = forward.layer(index, x, attend, cos, sin)
        return forward.logits(x)


def request_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """The token ids decoding starts from: `prompt` as one user message, or a conversation, rendered."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return prompt_ids(tokenizer, messages)


def engine_for(model: Any, tokenizer: Any) -> Engine:
    """A new engine for `model` under the applied profile: under `reference`, the reference decoder's
    (reprolora.decoding.reference).

    The caller keeps it for as long as it decodes with the model (infer.Model holds one; training and merge one for
    their probes): the engine holds what it builds as it decodes (the rotary table, the packed weights). No cache
    here: one kept on the model would hide the engine's state in a torch module, and a module-level one keyed weakly
    by the model would never let go of it (its engine refers to the model)."""
    if pins.is_applied() and pins.applied()["profile"] == "reference":
        from reprolora.decoding.reference import ReferenceEngine

        return ReferenceEngine(model, tokenizer)
    return Engine(model, tokenizer)


def greedy(
    engine: Engine,
    prompt: str | Messages,
    max_new_tokens: int,
    stop: list[str] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> Completion:
    """Greedy decoding of `prompt` (one user message, or a conversation) by `engine`, alone: the same bits as when
    it is decoded among others (Engine).

    `on_token` sees the generated ids after each new token (streaming); it does not change what is decoded.
    """
    sequence = engine.start(request_ids(engine.tokenizer, prompt), max_new_tokens, stop, on_token)
    while not sequence.done:
        engine.step([sequence])
    return sequence.completion()
