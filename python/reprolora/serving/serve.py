"""`reprolora serve`: one adapter behind a small OpenAI-compatible HTTP API, standard library only.

Routes (the ROUTES table): POST /v1/chat/completions, POST /v1/completions (both also as server-sent events with
`stream: true`), GET /v1/models, GET /healthz, GET /metrics (Prometheus text format). The official `openai` client
works against it (tests/test_chat.py).
Greedy decoding only, and concurrent requests are decoded together (continuous batching) by one decode thread that
owns the model and the tokenizer: handler threads submit requests to it and wait. The answer to a request still
depends on nothing but the request: the engine (reprolora.decoding.generate) runs every step at a fixed number of rows
and each request's attention on its own cache, so an answer is bit for bit the one it gets alone. Every error is a JSON
body {"error": {"message", "type"}} with a 4xx/5xx status; tracebacks go to the server's stderr, never to a client.
SIGTERM (or SIGINT) stops accepting connections, lets the requests already accepted finish, and exits 0.
"""

from __future__ import annotations

import itertools
import json
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class Metrics:
    """Request counts by route and status and latency sums, in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, tuple[float, int]] = {}
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.waiting = 0  # requests submitted and not yet decoding
        self.decode_steps = 0
        self.decode_rows = 0  # requests decoded, summed over the steps (rows computed: SLOTS per step)
        self.guessed_tokens = 0  # idle rows that carried a guessed token (generate's module docstring)
        self.accepted_guesses = 0  # those that were right: tokens beyond one per request and step

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            total, count = self.latency.get(route, (0.0, 0))
            self.latency[route] = (total + seconds, count + 1)

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def queue(self, delta: int) -> None:
        with self._lock:
            self.waiting += delta

    def decoded(self, rows: int, guessed: int, accepted: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows
            self.guessed_tokens += guessed
            self.accepted_guesses += accepted

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP reprolora_requests_total HTTP requests by route and status code.",
                "# TYPE reprolora_requests_total counter",
            ]
            lines += [
                f'reprolora_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP reprolora_request_duration_seconds Time from request read to response sent.",
                "# TYPE reprolora_request_duration_seconds summary",
            ]
            for route, (total, count) in sorted(self.latency.items()):
                lines.append(f'reprolora_request_duration_seconds_sum{{route="{route}"}} {total:.6f}')
                lines.append(f'reprolora_request_duration_seconds_count{{route="{route}"}} {count}')
            lines += [
                "# HELP reprolora_prompt_tokens_total Prompt tokens of answered completions.",
                "# TYPE reprolora_prompt_tokens_total counter",
                f"reprolora_prompt_tokens_total {self.prompt_tokens}",
                "# HELP reprolora_completion_tokens_total Generated tokens of answered completions.",
                "# TYPE reprolora_completion_tokens_total counter",
                f"reprolora_completion_tokens_total {self.completion_tokens}",
                "# HELP reprolora_queued_requests Completions waiting for the model.",
                "# TYPE reprolora_queued_requests gauge",
                f"reprolora_queued_requests {self.waiting}",
                "# HELP reprolora_decode_steps_total Decoding steps run (each a fixed number of rows).",
                "# TYPE reprolora_decode_steps_total counter",
                f"reprolora_decode_steps_total {self.decode_steps}",
                "# HELP reprolora_decode_rows_total Requests decoded in those steps, summed over the steps.",
                "# TYPE reprolora_decode_rows_total counter",
                f"reprolora_decode_rows_total {self.decode_rows}",
                "# HELP reprolora_guessed_tokens_total Idle rows of those steps that carried a guessed token.",
                "# TYPE reprolora_guessed_tokens_total counter",
                f"reprolora_guessed_tokens_total {self.guessed_tokens}",
                "# HELP reprolora_accepted_guesses_total Guessed tokens that were right (decoded beyond one a step).",
                "# TYPE reprolora_accepted_guesses_total counter",
                f"reprolora_accepted_guesses_total {self.accepted_guesses}",
            ]
        return "\n".join(lines) + "\n"


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


class TextStream:
    """Turns the growing list of generated ids into text deltas, sending only text that can't change any more:
    not a partial UTF-8 character, and not the start of a stop string (which would be cut)."""

    def __init__(self, tokenizer: Any, stops: list[str], send: Any) -> None:
        self.tokenizer, self.send = tokenizer, send
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.stops = stops
        self.sent = ""

    def on_token(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or any(s in text for s in self.stops) or not text.startswith(self.sent):
            return  # wait: an incomplete character, or the answer ends here (finish sends the rest)
        safe = text[: len(text) - self.hold] if self.hold else text
        if len(safe) > len(self.sent):
            self.send(safe[len(self.sent) :])
            self.sent = safe

    def finish(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.send(text[len(self.sent) :])
            self.sent = text


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
        self.engine = generate.engine_for(model.causal_lm, model.tokenizer)
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


class Server(ThreadingHTTPServer):
    # Non-daemon handler threads, joined by server_close(): a shutdown lets accepted requests finish.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], model: infer.Model, limits: Limits) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.limits = limits
        self.metrics = Metrics()
        self.decoder = Decoder(model, limits, self.metrics)
        self.started = int(time.time())
        self.ids = itertools.count(1)  # response ids; next() on a count is atomic under the GIL

    def submit(self, request: Request, on_token: Any = None, on_done: Any = None) -> Job:
        """Hand `request` to the decode thread; `on_token(ids)` runs there after each token (streaming)."""
        return self.decoder.submit(Job(request, on_token, on_done))

    def generate(self, request: Request) -> tuple[Any, int]:
        """(completion, prompt tokens), decoded among whatever else is in flight, limits checked first."""
        return self.submit(request).wait()

    def complete(self, prompt: str, max_tokens: int, stops: list[str]) -> dict[str, Any]:
        """A completions response (OpenAI's text_completion object) for one prompt."""
        completion, n_prompt = self.generate(Request(prompt, max_tokens, stops))
        return {
            "id": f"cmpl-{next(self.ids)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model.id,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                    **_proof(completion),
                }
            ],
            "usage": _usage(n_prompt, completion),
        }

    def chat(self, request: Request) -> dict[str, Any]:
        """A chat completions response (OpenAI's chat.completion object)."""
        completion, n_prompt = self.generate(request)
        return {
            "id": f"chatcmpl-{next(self.ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model.id,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                    **_proof(completion),
                }
            ],
            "usage": _usage(n_prompt, completion),
        }

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: what the answers depend on besides the request, here the manifest."""
        return f"fp_{self.model.manifest_sha256[:16]}"


def _proof(completion: Any) -> dict[str, Any]:
    """Extensions of each choice: what makes two answers comparable bit for bit."""
    return {
        "token_ids": completion.token_ids,
        "token_ids_sha256": infer.token_ids_sha256(completion.token_ids),
        "logits_sha256": completion.logits_sha256,
    }


def _usage(n_prompt: int, completion: Any) -> dict[str, int]:
    n = len(completion.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "reprolora"
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        started = time.perf_counter()
        path = self.path.split("?", 1)[0]
        route = path if path in ROUTE_BY_PATH else "other"
        self._streaming = False
        try:
            answer = self._route(method, path)
        except RequestError as e:
            answer = e.status, _error_body(e.status, str(e)), "application/json"
        except Exception:  # a bug: tell the operator, not the client
            traceback.print_exc(file=sys.stderr)
            if self._streaming:  # the status line has gone out: end the stream with an error event
                self._write_event({"error": {"message": "internal error; see the server log", "type": "server_error"}})
                answer = None
            else:
                answer = 500, _error_body(500, "internal error; see the server log"), "application/json"
        if answer is None:  # streamed: the stream has ended
            self.server.metrics.observe(route, 200, time.perf_counter() - started)
            return
        # Counted before the answer goes out: a client that reads it and then asks /metrics sees it counted.
        self.server.metrics.observe(route, answer[0], time.perf_counter() - started)
        self._send(*answer)

    def _route(self, method: str, path: str) -> tuple[int, bytes, str] | None:
        route = ROUTE_BY_PATH.get(path)
        if route is None:
            raise RequestError(404, f"no route {path!r}; routes: {', '.join(r.method + ' ' + r.path for r in ROUTES)}")
        if method != route.method:
            raise RequestError(405, f"{path} takes {route.method}, not {method}")
        return getattr(self, route.handler)()

    def healthz(self) -> tuple[int, bytes, str]:
        return 200, _json({"status": "ok", "model": self.server.model.id}), "application/json"

    def metrics(self) -> tuple[int, bytes, str]:
        return 200, self.server.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"

    def models(self) -> tuple[int, bytes, str]:
        model = self.server.model
        return (
            200,
            _json(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": model.id,
                            "object": "model",
                            "created": self.server.started,
                            "owned_by": "reprolora",
                            "manifest_sha256": model.manifest_sha256,
                            "base_model": model.manifest.inputs.base_model.name,
                        }
                    ],
                }
            ),
            "application/json",
        )

    def completions(self) -> tuple[int, bytes, str] | None:
        server = self.server
        request = parse_completion_request(self._read_body(), server.model.id, server.limits)
        if not request.stream:
            return 200, _json(server.complete(request.prompt, request.max_tokens, request.stops)), "application/json"
        head = {
            "id": f"cmpl-{next(server.ids)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.model.id,
        }

        def chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **extra}]}

        self._stream(
            request,
            lambda delta: chunk(delta),
            lambda completion: chunk("", completion.finish_reason, **_proof(completion)),
            head,
        )
        return None

    def chat_completions(self) -> tuple[int, bytes, str] | None:
        server = self.server
        request = parse_chat_request(self._read_body(), server.model.id, server.limits)
        if not request.stream:
            return 200, _json(server.chat(request)), "application/json"
        head = {
            "id": f"chatcmpl-{next(server.ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": server.model.id,
            "system_fingerprint": server.fingerprint,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                **head,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}],
            }

        # OpenAI's first chunk carries the role, and the content deltas follow.
        self._stream(
            request,
            lambda delta: chunk({"content": delta}),
            lambda completion: chunk({}, completion.finish_reason, **_proof(completion)),
            head,
            first=chunk({"role": "assistant", "content": ""}),
        )
        return None

    def _stream(
        self,
        request: Request,
        delta_chunk: Any,
        last_chunk: Any,
        head: dict[str, Any],
        first: dict[str, Any] | None = None,
    ) -> None:
        """Answer as server-sent events: `data: {chunk}` per text delta, the finish chunk, then `data: [DONE]`.

        The status line goes out with the first token, so a request that breaks a limit still gets a JSON error.
        """

        def send(delta: str) -> None:
            if not self._streaming:
                self._start_stream(first)
            self._write_event(delta_chunk(delta))

        # The decode thread turns tokens into text deltas and queues them; this thread writes them, so a slow client
        # never holds up the other requests in the batch.
        deltas: queue.Queue[str | None] = queue.Queue()
        stream = TextStream(self.server.model.tokenizer, request.stops, deltas.put)
        job = self.server.submit(request, stream.on_token, lambda: deltas.put(None))
        while (delta := deltas.get()) is not None:
            send(delta)
        completion, n_prompt = job.wait()
        stream.send = send  # decoding has ended: the rest of the text goes out from this thread
        stream.finish(completion.text)
        if not self._streaming:
            self._start_stream(first)
        self._write_event(last_chunk(completion))
        if request.include_usage:
            self._write_event({**head, "choices": [], "usage": _usage(n_prompt, completion)})
        self._write_raw(b"data: [DONE]\n\n")

    def _start_stream(self, first: dict[str, Any] | None) -> None:
        self._streaming = True
        self.close_connection = True  # the end of the stream is the end of the connection (HTTP/1.0)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if first is not None:
            self._write_event(first)

    def _write_event(self, obj: Any) -> None:
        self._write_raw(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; decoding goes on to the end, as a non-streamed request would

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length!r} is not a number") from None
        if size < 0:
            raise RequestError(400, f"Content-Length {size} is negative")
        if size > self.server.limits.max_body_bytes:
            self.close_connection = True
            # Read (a bounded part of) what the client is sending: closing a socket with unread data resets the
            # connection, and the client could lose our answer.
            remaining = min(size, 1 << 20)
            while remaining > 0 and (chunk := self.rfile.read(min(remaining, 65536))):
                remaining -= len(chunk)
            raise RequestError(
                413, f"request body is {size} bytes; this server allows at most {self.server.limits.max_body_bytes}"
            )
        body = self.rfile.read(size)
        if len(body) != size:
            raise RequestError(400, f"request body ended after {len(body)} of {size} bytes")
        return body

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to tell it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, header too long, ...) answer in JSON like ours, not HTML.
        self.close_connection = True
        self._send(code, _error_body(code, message or self.responses.get(code, ("error",))[0]), "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"reprolora: {self.address_string()} {format % args}\n")


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _error_body(status: int, message: str) -> bytes:
    return _json({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error")}})


def run(model: infer.Model, host: str, port: int, limits: Limits = Limits()) -> int:
    """Serve until SIGTERM or SIGINT; then finish the requests already accepted and return 0."""
    server = Server((host, port), model, limits)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            print(
                f"reprolora: {signal.Signals(signum).name}: finishing requests in flight, then exiting",
                file=sys.stderr,
                flush=True,
            )
            # shutdown() waits for serve_forever() to return, which runs in this (the main) thread: call it from
            # another.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound_host, bound_port = server.server_address[:2]
    print(
        f"reprolora: serving {model.id} on http://{bound_host}:{bound_port} (loaded in {model.load_seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # joins the handler threads: every accepted request gets its answer
        server.decoder.close()
    print("reprolora: stopped", file=sys.stderr, flush=True)
    return 0
