"""The decode thread of `reprolora serve`: requests submitted as jobs, admitted into the engine's free slots and
decoded together (continuous batching), with text streamed out as it becomes final.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Any

from reprolora.decoding import infer
from reprolora.decoding.stops import AnswerText
from reprolora.serving.metrics import Metrics
from reprolora.serving.protocol import Limits, Request, RequestError


class TextStream:
    """Turns the growing list of generated ids into text deltas, sending only text that can't change any more:
    not a partial UTF-8 character, and not the start of a stop string (which would be cut).

    The ids are decoded a few at a time (reprolora.decoding.stops); where a tokenizer's earlier text can change as
    the answer grows, none of it is final before the end, and `finish` sends it all."""

    def __init__(self, tokenizer: Any, stops: list[str], send: Any) -> None:
        self.send = send
        self.text = AnswerText(tokenizer, stops)
        self.sent: list[str] = []  # the deltas sent
        self.unsent = ""  # final text not sent yet: its last `hold` characters wait for what follows them

    def on_token(self, ids: list[int]) -> None:
        self.unsent += self.text.update(ids)
        if self.text.pending or self.text.has_stop:
            return  # wait: an incomplete character, or the answer ends here (finish sends the rest)
        hold = self.text.reach  # the longest start of a stop string
        if len(self.unsent) > hold:
            ready, self.unsent = self.unsent[: len(self.unsent) - hold], self.unsent[len(self.unsent) - hold :]
            self.send(ready)
            self.sent.append(ready)

    def finish(self, text: str) -> None:
        sent = "".join(self.sent)
        if text.startswith(sent) and len(text) > len(sent):
            self.send(text[len(sent) :])
            self.sent = [text]


class Job:
    """One request handed to the decode thread; `wait` gives its (completion, prompt tokens) or raises its error.

    `on_token(ids)` and `on_done()` are called in the decode thread: they must only hand things over, never block."""

    def __init__(self, request: Request, on_token: Any = None, on_done: Any = None) -> None:
        self.request, self.on_token, self.on_done = request, on_token, on_done
        self.completion: Any = None
        self.prompt_tokens = 0
        self.error: Exception | None = None
        self.finished = threading.Event()

    def finish(self, completion: Any = None, error: Exception | None = None) -> None:
        self.completion, self.error = completion, error
        self.finished.set()
        if self.on_done is not None:
            self.on_done()

    def wait(self) -> tuple[Any, int]:
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.completion, self.prompt_tokens


class Decoder:
    """The decode thread: owns the model and tokenizer, admits submitted jobs into free slots (each prompt run
    alone), and steps every decoding job together until it ends (continuous batching)."""

    def __init__(self, model: infer.Model, limits: Limits, metrics: Metrics) -> None:
        from reprolora.decoding import generate

        self.model, self.limits, self.metrics = model, limits, metrics
        self.engine = model.engine
        self.slots = generate.SLOTS
        self.submitted: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="reprolora-decode", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.metrics.queue(1)
        self.submitted.put(job)
        return job

    def close(self) -> None:
        self.submitted.put(None)
        self.thread.join(timeout=60)

    def _admit(self, job: Job) -> Any:
        """The job's sequence with its prompt run and first token chosen, or None when the job has ended already."""
        from reprolora.decoding.generate import request_ids

        self.metrics.queue(-1)
        request = job.request
        try:
            ids = request_ids(self.model.tokenizer, request.prompt)
            job.prompt_tokens = len(ids)
            if len(ids) > self.limits.max_prompt_tokens:
                raise RequestError(
                    400, f"prompt is {len(ids)} tokens; this server allows at most {self.limits.max_prompt_tokens}"
                )
            if len(ids) + request.max_tokens > self.model.context_length:
                raise RequestError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                    f"context length of {self.model.context_length}",
                )
            sequence = self.engine.start(ids, request.max_tokens, request.stops or None, job.on_token)
        except Exception as e:  # noqa: BLE001 - the handler thread reports it (a RequestError) or logs it (a bug)
            job.finish(error=e)
            return None
        if sequence.done:
            self._complete(job, sequence)
            return None
        return sequence

    def _complete(self, job: Job, sequence: Any) -> None:
        completion = sequence.completion()
        self.metrics.add_tokens(job.prompt_tokens, len(completion.token_ids))
        job.finish(completion)

    def _run(self) -> None:
        active: list[tuple[Job, Any]] = []
        while True:
            while len(active) < self.slots:
                try:  # block only when there is nothing to decode
                    job = self.submitted.get(block=not active)
                except queue.Empty:
                    break
                if job is None:
                    return
                sequence = self._admit(job)
                if sequence is not None:
                    active.append((job, sequence))
            if not active:
                continue
            guessed, accepted = self.engine.guessed, self.engine.accepted
            try:
                self.engine.step([sequence for _, sequence in active])
            except Exception as e:  # noqa: BLE001 - a bug: fail the jobs in the step, keep serving
                traceback.print_exc(file=sys.stderr)
                for job, _ in active:
                    job.finish(error=e)
                active = []
                continue
            self.metrics.decoded(len(active), self.engine.guessed - guessed, self.engine.accepted - accepted)
            for job, sequence in active:
                if sequence.done:
                    self._complete(job, sequence)
            active = [(job, sequence) for job, sequence in active if not sequence.done]
