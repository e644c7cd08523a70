"""Part 3 of bench_infer.py: `reprolora serve` in a subprocess under concurrent clients on loopback, and whether
every answer is the one-client answer for its prompt and the golden probe's tokens."""

from __future__ import annotations

import http.client
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def at(fraction: float) -> float:  # nearest rank
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    return {"latency_p50_s": at(0.50), "latency_p99_s": at(0.99), "latency_max_s": ordered[-1]}


def start_server(adapter: Path, base_dir: Path | None) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "reprolora", "serve", str(adapter), "--port", "0"]
    if base_dir is not None:
        command += ["--base-model", str(base_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port: list[int] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                ready.set()
            elif "Traceback" in line or "Error" in line:
                sys.stderr.write(line)
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=600)
    if not port:
        proc.kill()
        sys.exit("server did not start")
    return proc, port[0]


def load(port: int, jobs: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    """`jobs` sent by `clients` concurrent clients; the answers by prompt and the throughput and latency."""

    def ask(prompt: str) -> tuple[str, int, dict[str, Any], float]:
        tick = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({"prompt": prompt, "max_tokens": max_tokens}),
            {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        return prompt, response.status, body, time.perf_counter() - tick

    tick = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(ask, jobs))
    wall = time.perf_counter() - tick
    answers: dict[str, set[tuple[tuple[int, ...], str]]] = {}
    for prompt, status, body, _ in results:
        if status == 200:
            choice = body["choices"][0]
            answers.setdefault(prompt, set()).add((tuple(choice["token_ids"]), choice["logits_sha256"]))
    generated = sum(len(body["choices"][0]["token_ids"]) for _, status, body, _ in results if status == 200)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": sum(1 for _, status, _, _ in results if status != 200),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": generated / wall,
        **percentiles([seconds for *_, seconds in results]),
        "answers": answers,
    }


def bench_server(
    adapter: Path, base_dir: Path | None, jobs: list[str], expected: dict[str, list[int]], clients: int, max_tokens: int
) -> dict[str, Any]:
    proc, port = start_server(adapter, base_dir)
    try:
        load(port, jobs[:1], 1, max_tokens)  # warm-up
        alone = load(port, jobs, 1, max_tokens)
        together = load(port, jobs, clients, max_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    # One answer per prompt, whether alone or among others, and its tokens the golden probe's (a prefix of it when
    # max_tokens is below the probes' length).
    identical = all(
        len(together["answers"].get(p, ())) == 1 and together["answers"][p] == alone["answers"].get(p)
        for p in set(jobs)
    )
    match_probes = all(
        len(ids) == 1 and list(next(iter(ids))[0]) == expected[p][:max_tokens] for p, ids in alone["answers"].items()
    )
    for run in (alone, together):
        del run["answers"]
    return {
        "alone": alone,
        "together": together,
        "identical_to_alone": identical,
        "match_probes": match_probes,
        "exit_code": code,
    }
