"""The OpenAI-compatible protocol of `reprolora serve`: its routes, its limits, requests parsed and checked, and the
bodies of its answers and errors. Standard library only; no model here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from reprolora.decoding import infer


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    handler: str  # the Handler method that answers it
    summary: str


# The one list of routes: dispatch, the 404 message and `reprolora serve --help` all read it.
ROUTES = (
    Route("/v1/chat/completions", "POST", "chat_completions", "greedy answer to chat messages (stream: true for SSE)"),
    Route("/v1/completions", "POST", "completions", "greedy completion of a prompt (stream: true for SSE)"),
    Route("/v1/models", "GET", "models", "the served model, named by its manifest's sha256"),
    Route("/healthz", "GET", "healthz", "liveness"),
    Route("/metrics", "GET", "metrics", "Prometheus metrics"),
)
ROUTE_BY_PATH = {route.path: route for route in ROUTES}
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
# Fields of OpenAI's completions and chat requests that greedy decoding can honour only at their neutral value.
NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
CHAT_NEUTRAL = {
    "n": 1,
    "logprobs": False,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "parallel_tool_calls": None,
    "tool_choice": "none",
}
IGNORED = ("user", "seed")  # accepted and ignored: they can't change a greedy answer
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default when a request leaves max_tokens out


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _neutral(value: Any, wanted: Any) -> bool:
    """`value` is `wanted`: the same number (JSON's 1 and 1.0 alike), or the same true/false/null."""
    if wanted is None or isinstance(wanted, bool):
        return value is wanted
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == wanted


@dataclass(frozen=True)
class Request:
    """What a completions or chat request asks for, checked."""

    prompt: str | list[dict[str, str]]  # a prompt (one user message) or chat messages
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def _object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "request body must be a JSON object")
    return request


def _common(
    request: dict[str, Any],
    model_id: str,
    limits: Limits,
    neutral: dict[str, Any],
    allowed: set[str],
    max_tokens_fields: tuple[str, ...],
) -> tuple[int, list[str], bool, bool]:
    """(max_tokens, stops, stream, include_usage): the fields completions and chat share, checked."""
    unknown = sorted(
        set(request)
        - allowed
        - {"model", "stop", "temperature", "stream", "stream_options", *neutral, *IGNORED, *max_tokens_fields}
    )
    if unknown:
        raise RequestError(400, f"unsupported field(s): {', '.join(unknown)}")
    if "model" in request and request["model"] != model_id:
        raise RequestError(404, f"model {request['model']!r} not found; this server serves {model_id!r}")
    temperature = request.get("temperature")
    if temperature is not None and not _neutral(temperature, 0):
        raise RequestError(400, f"'temperature' must be 0 or absent: this server decodes greedily, got {temperature!r}")
    for name, wanted in neutral.items():
        if name in request and request[name] is not None and not _neutral(request[name], wanted):
            raise RequestError(
                400, f"'{name}' is not supported except as {json.dumps(wanted)}, got {json.dumps(request[name])}"
            )
    given = [name for name in max_tokens_fields if request.get(name) is not None]
    if len(given) > 1:
        raise RequestError(400, f"give one of {' and '.join(repr(n) for n in given)}, not both")
    name = given[0] if given else max_tokens_fields[0]
    max_tokens = request[name] if given else min(limits.default_max_tokens, limits.max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, f"'{name}' must be a positive integer, got {json.dumps(max_tokens)}")
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"'{name}' is {max_tokens}; this server allows at most {limits.max_tokens}")
    stop = request.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP}")
    stream = request.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {json.dumps(stream)}")
    options = request.get("stream_options")
    if options is not None and (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise RequestError(400, "'stream_options' may only hold 'include_usage': true or false")
    if options is not None and not stream:
        raise RequestError(400, "'stream_options' is only allowed with 'stream': true")
    return max_tokens, stops, bool(stream), bool((options or {}).get("include_usage"))


def parse_completion_request(body: bytes, model_id: str, limits: Limits) -> Request:
    """A completions request, or a RequestError saying what is wrong."""
    request = _object(body)
    max_tokens, stops, stream, usage = _common(request, model_id, limits, NEUTRAL, {"prompt"}, ("max_tokens",))
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' is required and must be a string")
    if not prompt:
        raise RequestError(400, "'prompt' must not be empty")
    return Request(prompt, max_tokens, stops, stream, usage)


def _message_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (what the openai client sends for multi-part)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"{where}: 'content' must be a string or a list of text parts")


def parse_chat_request(body: bytes, model_id: str, limits: Limits) -> Request:
    """A chat completions request, or a RequestError saying what is wrong."""
    request = _object(body)
    max_tokens, stops, stream, usage = _common(
        request, model_id, limits, CHAT_NEUTRAL, {"messages"}, ("max_completion_tokens", "max_tokens")
    )
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required and must be a non-empty list")
    conversation = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise RequestError(400, f"{where}: unsupported field(s): {', '.join(extra)}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(400, f"{where}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        conversation.append({"role": CHAT_ROLES[role], "content": _message_text(message.get("content"), where)})
    if conversation[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must not be the assistant's: there is nothing to answer")
    return Request(conversation, max_tokens, stops, stream, usage)


def proof(completion: Any) -> dict[str, Any]:
    """Extensions of each choice: what makes two answers comparable bit for bit."""
    return {
        "token_ids": completion.token_ids,
        "token_ids_sha256": infer.token_ids_sha256(completion.token_ids),
        "logits_sha256": completion.logits_sha256,
    }


def usage(n_prompt: int, completion: Any) -> dict[str, int]:
    n = len(completion.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def json_body(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def error_body(status: int, message: str) -> bytes:
    return json_body({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error")}})
