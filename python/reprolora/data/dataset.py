"""Datasets: JSONL with one example a line, alpaca style or chat `messages`, tokenized with loss on responses only.

Alpaca lines: {"instruction": str, "input": str (optional), "output": str}.
Chat lines:   {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}, ending with an
              assistant message; every assistant message is learned.
The tokenizer's chat template renders the conversation when it has one; otherwise a plain "### Role:" format.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from reprolora.core.canonical import sha256_bytes
from reprolora.core.errors import ReproloraError

IGNORE = -100  # label of a token the loss skips (prompt, template, padding)
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Dataset:
    name: str  # file name only: manifests hold no paths
    sha256: str
    conversations: list[Messages]


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def _check_string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ReproloraError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_line(obj: Any, where: str) -> Messages:
    """One JSONL record as chat messages."""
    if not isinstance(obj, dict):
        raise ReproloraError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if "messages" in keys:
        if keys != {"messages"}:
            raise ReproloraError(f"{where}: a chat example has only 'messages', also got {sorted(keys - {'messages'})}")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ReproloraError(f"{where}: 'messages' must be a non-empty list")
        result = []
        for i, message in enumerate(messages):
            at = f"{where}: messages[{i}]"
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                raise ReproloraError(f"{at} must be an object with exactly 'role' and 'content'")
            role = _check_string(message["role"], at, "role")
            if role not in ROLES:
                raise ReproloraError(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
            result.append({"role": role, "content": _check_string(message["content"], at, "content")})
        if result[-1]["role"] != "assistant":
            raise ReproloraError(f"{where}: the last message must be the assistant's, got {result[-1]['role']!r}")
        return result
    if {"instruction", "output"} <= keys <= {"instruction", "input", "output"}:
        instruction = _check_string(obj["instruction"], where, "instruction")
        context = _check_string(obj.get("input", ""), where, "input")
        output = _check_string(obj["output"], where, "output")
        if not instruction.strip() or not output.strip():
            raise ReproloraError(f"{where}: 'instruction' and 'output' must not be empty")
        return [
            {"role": "user", "content": user_content(instruction, context)},
            {"role": "assistant", "content": output},
        ]
    raise ReproloraError(f"{where}: expected keys instruction/input/output or messages, got {sorted(keys) or 'none'}")


def user_content(instruction: str, context: str = "") -> str:
    return f"{instruction}\n\n{context}" if context else instruction


def load(path: str) -> Dataset:
    """The dataset in `path`, or the built-in default for ""; every line checked."""
    if path:
        file = Path(path)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise ReproloraError(f"{file}: dataset file not found") from None
        except OSError as e:
            raise ReproloraError(f"{file}: can't read dataset: {e}") from None
        name, label = file.name, str(file)
    else:
        data = resources.files("reprolora.data").joinpath("default.jsonl").read_bytes()
        name, label = "default.jsonl", "<built-in default.jsonl>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReproloraError(f"{label}: not UTF-8 text: {e}") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReproloraError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        conversations.append(parse_line(obj, where))
    if len(conversations) < 2:
        raise ReproloraError(
            f"{label}: needs at least 2 examples (one to train on, one to evaluate), got {len(conversations)}"
        )
    return Dataset(name=name, sha256=sha256_bytes(data), conversations=conversations)


def split(count: int, eval_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Train and eval indices from a seeded shuffle; at least one of each."""
    order = list(range(count))
    rng.shuffle(order)
    n_eval = min(max(1, round(count * eval_fraction)), count - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


# Llama 3's chat templates write today's date (transformers' strftime_now) unless given a `date_string`: a fixed
# one keeps the text, and so the bytes, the same on every day. It is the date those templates fall back to.
TEMPLATE_DATE = "26 Jul 2024"


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    """The text of a conversation: the tokenizer's chat template, or a plain format when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        if "strftime_now" in str(template) and "date_string" not in str(template):
            raise ReproloraError(
                "the base model's chat template writes today's date (strftime_now), so its text changes "
                "every day; give the model a tokenizer_config.json whose template does not"
            )
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE
        )
    text = ""
    for m in messages:
        end = (tokenizer.eos_token or "") if m["role"] == "assistant" else ""  # the model learns to stop
        text += f"### {m['role'].capitalize()}:\n{m['content']}{end}\n\n"
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a prompt ready for the assistant's answer: exactly what training saw before a response."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def tokenize(tokenizer: Any, messages: Messages, max_len: int, where: str) -> Tokenized:
    """Input ids and labels; labels are the ids on assistant text (template tokens included) and IGNORE elsewhere."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:k], add_generation_prompt=True)
        full = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ReproloraError(f"{where}: the chat template does not render conversations incrementally")
        pieces += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    input_ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learned else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels[1:]):
        raise ReproloraError(f"{where}: no response token fits in max_seq_len={max_len}; raise dataset.max_seq_len")
    return Tokenized(input_ids, labels)


def line_label(dataset: Dataset, index: int) -> str:
    return f"{dataset.name}: example {index + 1}"
