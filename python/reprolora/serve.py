"""`reprolora serve`: one adapter behind a small OpenAI-compatible HTTP API, standard library only.

Routes: POST /v1/completions, GET /v1/models, GET /healthz, GET /metrics (Prometheus text format).
Greedy decoding only, so the answer to a request depends on nothing but the request: one lock serialises every
use of the model and tokenizer, concurrent requests wait their turn (a batch would change the padding and with it
the bits). Every error is a JSON body {"error": {"message", "type"}} with a 4xx/5xx status; tracebacks go to the
server's stderr, never to a client. SIGTERM (or SIGINT) stops accepting connections, lets the requests already
accepted finish, and exits 0.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reprolora import infer

ROUTES = ("/v1/completions", "/v1/models", "/healthz", "/metrics")
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               411: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}
# Fields of OpenAI's completions request that greedy decoding can honour only at their neutral value.
NEUTRAL = {"n": 1, "best_of": 1, "stream": False, "echo": False, "logprobs": None, "top_p": 1,
           "presence_penalty": 0, "frequency_penalty": 0}
IGNORED = ("user", "seed")  # accepted and ignored: they can't change a greedy answer
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
        self.waiting = 0  # requests queued for the model lock

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

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP reprolora_requests_total HTTP requests by route and status code.",
                     "# TYPE reprolora_requests_total counter"]
            lines += [f'reprolora_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            lines += ["# HELP reprolora_request_duration_seconds Time from request read to response sent.",
                      "# TYPE reprolora_request_duration_seconds summary"]
            for route, (total, count) in sorted(self.latency.items()):
                lines.append(f'reprolora_request_duration_seconds_sum{{route="{route}"}} {total:.6f}')
                lines.append(f'reprolora_request_duration_seconds_count{{route="{route}"}} {count}')
            lines += ["# HELP reprolora_prompt_tokens_total Prompt tokens of answered completions.",
                      "# TYPE reprolora_prompt_tokens_total counter", f"reprolora_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP reprolora_completion_tokens_total Generated tokens of answered completions.",
                      "# TYPE reprolora_completion_tokens_total counter",
                      f"reprolora_completion_tokens_total {self.completion_tokens}",
                      "# HELP reprolora_queued_requests Completions waiting for the model.",
                      "# TYPE reprolora_queued_requests gauge", f"reprolora_queued_requests {self.waiting}"]
        return "\n".join(lines) + "\n"


def _neutral(value: Any, wanted: Any) -> bool:
    """`value` is `wanted`: the same number (JSON's 1 and 1.0 alike), or the same true/false/null."""
    if wanted is None or isinstance(wanted, bool):
        return value is wanted
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == wanted


def parse_completion_request(body: bytes, model_id: str, limits: Limits) -> tuple[str, int, list[str]]:
    """(prompt, max_tokens, stop) of a completions request, or a RequestError saying what is wrong."""
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "request body must be a JSON object")
    known = {"model", "prompt", "max_tokens", "stop", "temperature", *NEUTRAL, *IGNORED}
    unknown = sorted(set(request) - known)
    if unknown:
        raise RequestError(400, f"unsupported field(s): {', '.join(unknown)}")
    if "model" in request and request["model"] != model_id:
        raise RequestError(404, f"model {request['model']!r} not found; this server serves {model_id!r}")
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' is required and must be a string")
    if not prompt:
        raise RequestError(400, "'prompt' must not be empty")
    temperature = request.get("temperature")
    if temperature is not None and not _neutral(temperature, 0):
        raise RequestError(400, f"'temperature' must be 0 or absent: this server decodes greedily, got {temperature!r}")
    for name, wanted in NEUTRAL.items():
        if name in request and request[name] is not None and not _neutral(request[name], wanted):
            raise RequestError(400, f"'{name}' is not supported except as {json.dumps(wanted)}, got {json.dumps(request[name])}")
    max_tokens = request.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, got {json.dumps(max_tokens)}")
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens}")
    stop = request.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP}")
    return prompt, max_tokens, stops


class Server(ThreadingHTTPServer):
    # Non-daemon handler threads, joined by server_close(): a shutdown lets accepted requests finish.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], model: infer.Model, limits: Limits) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.limits = limits
        self.metrics = Metrics()
        self.model_lock = threading.Lock()
        self.started = int(time.time())
        self.served = 0

    def complete(self, prompt: str, max_tokens: int, stops: list[str]) -> dict[str, Any]:
        self.metrics.queue(1)
        with self.model_lock:  # the tokenizer is not thread-safe either, so counting happens in here too
            self.metrics.queue(-1)
            n_prompt = infer.prompt_tokens(self.model, prompt)
            if n_prompt > self.limits.max_prompt_tokens:
                raise RequestError(400, f"prompt is {n_prompt} tokens; this server allows at most {self.limits.max_prompt_tokens}")
            if n_prompt + max_tokens > self.model.context_length:
                raise RequestError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                        f"context length of {self.model.context_length}")
            completion = infer.complete(self.model, prompt, max_tokens, stops or None)
            self.served += 1
            number = self.served
        self.metrics.add_tokens(n_prompt, len(completion.token_ids))
        return {
            "id": f"cmpl-{number}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model.id,
            "choices": [{
                "index": 0,
                "text": completion.text,
                "logprobs": None,
                "finish_reason": completion.finish_reason,
                # Extensions: what makes two answers comparable bit for bit.
                "token_ids": completion.token_ids,
                "token_ids_sha256": infer.token_ids_sha256(completion.token_ids),
                "logits_sha256": completion.logits_sha256,
            }],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(completion.token_ids),
                      "total_tokens": n_prompt + len(completion.token_ids)},
        }


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
        route = path if path in ROUTES else "other"
        try:
            status, body, content_type = self._route(method, path)
        except RequestError as e:
            status, body, content_type = e.status, _error_body(e.status, str(e)), "application/json"
        except Exception:  # a bug: tell the operator, not the client
            traceback.print_exc(file=sys.stderr)
            status, body, content_type = 500, _error_body(500, "internal error; see the server log"), "application/json"
        self._send(status, body, content_type)
        self.server.metrics.observe(route, status, time.perf_counter() - started)

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        wanted = {"/v1/completions": "POST", "/v1/models": "GET", "/healthz": "GET", "/metrics": "GET"}.get(path)
        if wanted is None:
            raise RequestError(404, f"no route {path!r}; routes: {', '.join(ROUTES)}")
        if method != wanted:
            raise RequestError(405, f"{path} takes {wanted}, not {method}")
        model = self.server.model
        if path == "/healthz":
            return 200, _json({"status": "ok", "model": model.id}), "application/json"
        if path == "/metrics":
            return 200, self.server.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/v1/models":
            return 200, _json({"object": "list", "data": [{
                "id": model.id, "object": "model", "created": self.server.started, "owned_by": "reprolora",
                "manifest_sha256": model.manifest_sha256,
                "base_model": model.manifest.inputs.base_model.name,
            }]}), "application/json"
        prompt, max_tokens, stops = parse_completion_request(self._read_body(), model.id, self.server.limits)
        return 200, _json(self.server.complete(prompt, max_tokens, stops)), "application/json"

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
            raise RequestError(413, f"request body is {size} bytes; this server allows at most {self.server.limits.max_body_bytes}")
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
            print(f"reprolora: {signal.Signals(signum).name}: finishing requests in flight, then exiting", file=sys.stderr, flush=True)
            # shutdown() waits for serve_forever() to return, which runs in this (the main) thread: call it from another.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound_host, bound_port = server.server_address[:2]
    print(f"reprolora: serving {model.id} on http://{bound_host}:{bound_port} (loaded in {model.load_seconds:.1f} s)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # joins the handler threads: every accepted request gets its answer
    print("reprolora: stopped", file=sys.stderr, flush=True)
    return 0
