"""`reprolora serve`: same answers as the CLI, a status code for every bad request, a load test, SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli

PROMPT = "Why pin seeds?"
LIMITS = ["--max-body-bytes", "4096", "--max-prompt-tokens", "64", "--max-tokens", "32"]


class Server:
    """A `reprolora serve` process on a free port; its stderr is drained by a thread so the pipe never fills."""

    def __init__(self, adapter: Path, base: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reprolora",
                "serve",
                str(adapter),
                "--base-model",
                str(base),
                "--port",
                "0",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        self.log: list[str] = []
        ready = threading.Event()
        self.port = 0

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()
            ready.set()  # the process ended

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        ready.wait(timeout=300)
        if not self.port:
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.log))

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Content-Type", "")
        finally:
            conn.close()

    def complete(self, **fields: Any) -> dict[str, Any]:
        status, body, _ = self.request("POST", "/v1/completions", fields)
        assert status == 200, body
        return json.loads(body)

    def raw(self, data: bytes) -> tuple[int, bytes]:
        """Send bytes as they are; return the status code and the body (status 0: an HTTP/0.9 answer, body only)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        if not received.startswith(b"HTTP/"):
            return 0, received
        head, _, body = received.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return code


@pytest.fixture(scope="module")
def server(tiny_adapter: Path, tiny_base_model: Path) -> Iterator[Server]:
    running = Server(tiny_adapter, tiny_base_model, *LIMITS)
    yield running
    assert running.stop() == 0, "".join(running.log)
    assert "Traceback" not in "".join(running.log)


def test_cli_and_server_give_the_same_answer(server: Server, tiny_adapter: Path, tiny_base_model: Path) -> None:
    cli = json.loads(
        run_cli("infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "--json", PROMPT, "-n", "8").stdout
    )
    answer = server.complete(prompt=PROMPT, max_tokens=8, temperature=0)
    choice = answer["choices"][0]
    assert choice["text"] == cli["text"]
    assert choice["token_ids"] == cli["token_ids"]
    assert choice["token_ids_sha256"] == cli["token_ids_sha256"]
    assert choice["logits_sha256"] == cli["logits_sha256"]
    assert choice["finish_reason"] == cli["finish_reason"]
    assert answer["model"] == cli["model"]
    assert answer["usage"] == {
        "prompt_tokens": cli["prompt_tokens"],
        "completion_tokens": cli["completion_tokens"],
        "total_tokens": cli["prompt_tokens"] + cli["completion_tokens"],
    }


def test_stop_strings(server: Server) -> None:
    full = server.complete(prompt=PROMPT, max_tokens=8)["choices"][0]
    assert len(full["text"]) >= 2
    stop = full["text"][1]
    cut = server.complete(prompt=PROMPT, max_tokens=8, stop=[stop, "never-seen"])["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].index(stop)]


def test_models_health_and_metrics(server: Server) -> None:
    status, body, content_type = server.request("GET", "/v1/models")
    assert status == 200 and content_type == "application/json"
    models = json.loads(body)["data"]
    assert len(models) == 1 and models[0]["id"].startswith("reprolora-")
    status, body, _ = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    server.request("GET", "/nowhere")
    status, body, content_type = server.request("GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    text = body.decode()
    assert re.search(r'^reprolora_requests_total\{route="/healthz",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^reprolora_requests_total\{route="other",status="404"\} [1-9]', text, re.M)
    assert re.search(r'^reprolora_request_duration_seconds_count\{route="/v1/models"\} [1-9]', text, re.M)
    assert "# TYPE reprolora_request_duration_seconds summary" in text


OK = {"prompt": PROMPT, "max_tokens": 4}
BAD_REQUESTS = [
    ("malformed JSON", "POST", "/v1/completions", b'{"prompt": "x",', 400),
    ("not UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff"}', 400),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 4}, 400),
    ("prompt not a string", "POST", "/v1/completions", {"prompt": ["a", "b"]}, 400),
    ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400),
    ("temperature", "POST", "/v1/completions", {**OK, "temperature": 0.7}, 400),
    ("temperature not a number", "POST", "/v1/completions", {**OK, "temperature": "0"}, 400),
    ("stream not a bool", "POST", "/v1/completions", {**OK, "stream": "yes"}, 400),
    ("n", "POST", "/v1/completions", {**OK, "n": 2}, 400),
    ("unknown field", "POST", "/v1/completions", {**OK, "suffix": "x"}, 400),
    ("max_tokens zero", "POST", "/v1/completions", {**OK, "max_tokens": 0}, 400),
    ("max_tokens over the limit", "POST", "/v1/completions", {**OK, "max_tokens": 33}, 400),
    ("max_tokens a string", "POST", "/v1/completions", {**OK, "max_tokens": "4"}, 400),
    ("max_tokens a bool", "POST", "/v1/completions", {**OK, "max_tokens": True}, 400),
    ("empty stop", "POST", "/v1/completions", {**OK, "stop": ""}, 400),
    ("too many stops", "POST", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("stop not strings", "POST", "/v1/completions", {**OK, "stop": [1]}, 400),
    ("prompt over the token limit", "POST", "/v1/completions", {"prompt": "x" * 100, "max_tokens": 4}, 400),
    ("body over the byte limit", "POST", "/v1/completions", {"prompt": "x" * 5000}, 413),
    ("other model", "POST", "/v1/completions", {**OK, "model": "gpt-4"}, 404),
    ("unknown route", "GET", "/v2/anything", None, 404),
    ("GET completions", "GET", "/v1/completions", None, 405),
    ("POST healthz", "POST", "/healthz", {}, 405),
    ("DELETE models", "DELETE", "/v1/models", None, 405),
]


@pytest.mark.parametrize(
    "method, path, body, status", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_request_gets_its_status(server: Server, method: str, path: str, body: Any, status: int) -> None:
    got, raw, content_type = server.request(method, path, body)
    assert got == status, raw
    assert content_type == "application/json"
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type"} and error["message"] and error["type"]
    assert "Traceback" not in error["message"]


def test_requests_http_server_rejects_itself(server: Server) -> None:
    """Length missing, chunked, a garbled request line: JSON errors too, never HTML or a trace."""
    status, body = server.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and json.loads(body)["error"]["message"]
    status, body = server.raw(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status == 411 and json.loads(body)["error"]["message"]
    status, body = server.raw(b"POST /v1/completions HTTP/1.1\r\nContent-Length: many\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["message"]
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(101))
    status, body = server.raw(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
    assert status == 431 and json.loads(body)["error"]["message"]
    # A one-word request line is HTTP/0.9 to http.server, which answers with a body and no status line.
    status, body = server.raw(b"NONSENSE\r\n\r\n")
    assert status == 0 and json.loads(body)["error"]["message"] == "Bad request syntax ('NONSENSE')"
    assert server.request("GET", "/healthz")[0] == 200  # and it still serves


def test_load_concurrent_clients_get_identical_answers(server: Server) -> None:
    prompts = [PROMPT, "Why check hashes?"]
    reference = {p: server.complete(prompt=p, max_tokens=12)["choices"][0] for p in prompts}
    jobs = [prompts[i % 2] for i in range(8 * 4)]  # 8 clients x 4 requests

    def ask(prompt: str) -> tuple[str, int, dict[str, Any]]:
        status, body, _ = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12})
        return prompt, status, json.loads(body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, jobs))
    assert [status for _, status, _ in results] == [200] * len(jobs)
    for prompt, _, answer in results:
        choice = answer["choices"][0]
        assert (choice["token_ids"], choice["text"], choice["logits_sha256"]) == (
            reference[prompt]["token_ids"],
            reference[prompt]["text"],
            reference[prompt]["logits_sha256"],
        )


def test_sigterm_finishes_the_request_in_flight(tiny_adapter: Path, tiny_base_model: Path) -> None:
    server = Server(tiny_adapter, tiny_base_model)
    expected = server.complete(prompt=PROMPT, max_tokens=8)["choices"][0]["token_ids"]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(head + body[:10])  # the server has accepted this request and waits for the rest
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # still running: a request is in flight
        sock.sendall(body[10:])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head_bytes, _, answer = received.partition(b"\r\n\r\n")
    assert head_bytes.split()[1] == b"200"
    assert json.loads(answer)["choices"][0]["token_ids"] == expected
    assert server.stop() == 0
    log = "".join(server.log)
    assert "SIGTERM: finishing requests in flight" in log and "reprolora: stopped" in log
    assert "Traceback" not in log
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_serve_check_refuses_to_start_on_failed_probes(
    tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from reprolora.core.canonical import canonical_json, file_entry

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(n for n in tensors if "lora_B" in n and "v_proj" in n)[-1]
    tensors[name][0, 0] += 20.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    manifest = json.loads((adapter / "manifest.json").read_text())
    manifest["files"]["adapter_model.safetensors"] = file_entry(weights)
    (adapter / "manifest.json").write_bytes(canonical_json(manifest))
    result = run_cli("serve", str(adapter), "--base-model", str(tiny_base_model), "--port", "0", "--check", check=False)
    assert result.returncode == 1
    assert "first differing token" in result.stderr and "serving" not in result.stderr
