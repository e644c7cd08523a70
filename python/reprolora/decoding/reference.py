"""Greedy decoding by the reference decoder (profile `reference`): the logits of each step are one number on
every machine, and a request's tokens do not depend on what else is decoded, by construction.

Each step runs the whole sequence again and takes the last row's logits. A key/value cache would give the same
bits (each row of a correctly rounded product is computed alone), at less cost; it is not written yet.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from reprolora.data.dataset import Messages
from reprolora.decoding.generate import Completion, request_ids, stop_token_ids
from reprolora.models.reference import Decoder


@torch.no_grad()
def greedy(decoder: Decoder, model: Any, tokenizer: Any, prompt: str | Messages, max_new_tokens: int) -> Completion:
    """Greedy decoding of `prompt`: the argmax token (lowest id on ties) until an end token or max_new_tokens;
    logits_sha256 hashes every step's float32 logits in order."""
    prompt_ids = request_ids(tokenizer, prompt)
    eos = stop_token_ids(tokenizer, model.get_base_model() if hasattr(model, "get_base_model") else model)
    ids, generated, digest, finish = list(prompt_ids), [], hashlib.sha256(), "length"
    for _ in range(max_new_tokens):
        h = decoder.hidden(torch.tensor(ids), [len(ids)])
        logits = decoder.logits(h[-1:])[0]
        digest.update(logits.numpy().tobytes())
        token = int(torch.argmax(logits))
        if token in eos:
            finish = "stop"
            break
        generated.append(token)
        ids.append(token)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return Completion(list(prompt_ids), generated, text, finish, digest.hexdigest())
