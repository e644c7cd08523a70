"""Greedy decoding, written out so the same loop runs at training (golden probes) and at inference."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from reprolora.dataset import Messages, prompt_ids


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


@torch.inference_mode()
def greedy(model: Any, tokenizer: Any, prompt: str | Messages, max_new_tokens: int, stop: list[str] | None = None,
           on_token: Callable[[list[int]], None] | None = None) -> Completion:
    """Greedy decoding of `prompt` (one user message, or a conversation) with a key/value cache.

    `on_token` sees the generated ids after each new token (streaming); it does not change what is decoded.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = prompt_ids(tokenizer, messages)
    eos = stop_token_ids(tokenizer, model)
    digest = hashlib.sha256()
    generated: list[int] = []
    finish = "length"
    if hasattr(model, "get_base_model"):  # a PeftModel: decode with the model inside, as training does
        model = model.get_base_model()
    parameters = inspect.signature(model.forward).parameters
    # transformers 5.x renamed the key/value cache argument from past_key_values to cache.
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    # Only the last position's logits are used: computing just those skips a [prompt x vocab] matmul at the first
    # step (25% of the first-token latency on the default model). The output projection then always runs on one
    # row, and that kernel's bits are what the probes' logits hash records.
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    past = None
    step_input = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, use_cache=True, **{cache_arg: past}, **keep_last)
        logits = out.logits[0, -1].float()
        digest.update(logits.numpy().tobytes())
        token = int(torch.argmax(logits))
        if token in eos:
            finish = "stop"
            break
        generated.append(token)
        if on_token is not None:
            on_token(generated)
        if stop and any(s in tokenizer.decode(generated, skip_special_tokens=True) for s in stop):
            finish = "stop"
            break
        past = getattr(out, cache_arg)
        step_input = torch.tensor([[token]], dtype=torch.long)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if stop:
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    return Completion(ids, generated, text, finish, digest.hexdigest())
