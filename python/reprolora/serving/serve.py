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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reprolora.decoding import infer
from reprolora.serving.metrics import Metrics
from reprolora.serving.protocol import (
    ROUTE_BY_PATH,
    ROUTES,
    Limits,
    Request,
    RequestError,
    error_body,
    json_body,
    parse_chat_request,
    parse_completion_request,
    proof,
    usage,
)
from reprolora.serving.scheduler import Decoder, Job, TextStream


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
                    **proof(completion),
                }
            ],
            "usage": usage(n_prompt, completion),
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
                    **proof(completion),
                }
            ],
            "usage": usage(n_prompt, completion),
        }

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: what the answers depend on besides the request, here the manifest."""
        return f"fp_{self.model.manifest_sha256[:16]}"


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
            answer = e.status, error_body(e.status, str(e)), "application/json"
        except Exception:  # a bug: tell the operator, not the client
            traceback.print_exc(file=sys.stderr)
            if self._streaming:  # the status line has gone out: end the stream with an error event
                self._write_event({"error": {"message": "internal error; see the server log", "type": "server_error"}})
                answer = None
            else:
                answer = 500, error_body(500, "internal error; see the server log"), "application/json"
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
        return 200, json_body({"status": "ok", "model": self.server.model.id}), "application/json"

    def metrics(self) -> tuple[int, bytes, str]:
        return 200, self.server.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"

    def models(self) -> tuple[int, bytes, str]:
        model = self.server.model
        return (
            200,
            json_body(
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
            return (
                200,
                json_body(server.complete(request.prompt, request.max_tokens, request.stops)),
                "application/json",
            )
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
            lambda completion: chunk("", completion.finish_reason, **proof(completion)),
            head,
        )
        return None

    def chat_completions(self) -> tuple[int, bytes, str] | None:
        server = self.server
        request = parse_chat_request(self._read_body(), server.model.id, server.limits)
        if not request.stream:
            return 200, json_body(server.chat(request)), "application/json"
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
            lambda completion: chunk({}, completion.finish_reason, **proof(completion)),
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
            self._write_event({**head, "choices": [], "usage": usage(n_prompt, completion)})
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
        self._send(code, error_body(code, message or self.responses.get(code, ("error",))[0]), "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"reprolora: {self.address_string()} {format % args}\n")


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
