"""Benchmark: `reprolora infer`'s decoding path against plain transformers + peft `generate`, and `serve` under load.

Part 1, in this process: the adapter is loaded twice, once by reprolora.infer (hash checks, pins, PeftModel) and
once the plain way (AutoModelForCausalLM + PeftModel.from_pretrained, no checks); each answers the same prompt
greedily, in `--repeats` back-to-back pairs (each path first in turn). Both run under the adapter's determinism
pins, which this process applies before torch loads, so the comparison is between the two decoding paths.
Reported: tokens/s over a full answer (tokenizing the prompt included), first-token latency (a run with one new
token: prompt in, first token out), and the median over pairs of reprolora's time / plain generate's time.
Target: <= 1.0.

Part 2: `reprolora serve` in a subprocess, `--clients` concurrent clients on loopback sending `--requests` each
(the manifest's probe prompts in turn). Reported: requests/s and generated tokens/s; every answer must be
identical to the others for its prompt and to the golden probe recorded at training.

    REPROLORA_CACHE=... python python/benchmarks/bench_infer.py [ADAPTER] [--base-model DIR] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reprolora import manifest  # no torch: the pins still come first

DEFAULT_ADAPTER = "out/adapter"
FIRST_TOKEN_RUNS = 4  # per repeat and path


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_decoding(adapter: Path, base_dir: Path | None, prompt: str, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    from reprolora import infer

    model = infer.load(adapter, base_dir)  # applies the adapter's pins: torch is imported after this line
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The plain way, as a transformers + peft user writes it.
    plain_tokenizer = AutoTokenizer.from_pretrained(model.base_folder)
    plain_base = AutoModelForCausalLM.from_pretrained(model.base_folder, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain_base, str(adapter)).eval()

    def plain_generate(n: int) -> list[int]:
        inputs = plain_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            output = plain.generate(**inputs, max_new_tokens=n, do_sample=False,
                                    pad_token_id=plain_tokenizer.pad_token_id or plain_tokenizer.eos_token_id)
        return output[0, inputs["input_ids"].shape[1]:].tolist()

    def ours(n: int) -> list[int]:
        return infer.complete(model, prompt, n).token_ids

    def timed(fn: Any, n: int) -> tuple[float, list[int]]:
        tick = time.perf_counter()
        ids = fn(n)
        return time.perf_counter() - tick, ids

    for fn in (ours, plain_generate):  # warm-up: first calls pay for lazy initialisation
        fn(2)
    times: dict[str, dict[str, list[float]]] = {name: {"full": [], "first": []} for name in ("reprolora", "plain")}
    tokens: dict[str, list[int]] = {}
    paths = [("reprolora", ours), ("plain", plain_generate)]
    for repeat in range(repeats):
        # Back to back in pairs, each path first in turn: a drift in machine speed (a shared VM) weighs on both alike,
        # and the ratio of each pair is taken before the median.
        order = paths if repeat % 2 == 0 else paths[::-1]
        for name, fn in order:
            seconds, ids = timed(fn, max_new_tokens)
            times[name]["full"].append(seconds / max(1, len(ids)))
            tokens[name] = ids
        for _ in range(FIRST_TOKEN_RUNS):  # short runs: more of them, for a steadier number
            for name, fn in order:
                times[name]["first"].append(timed(fn, 1)[0])
    eos = set(filter(None, [plain_tokenizer.eos_token_id]))
    plain_ids = [t for t in tokens["plain"] if t not in eos]  # generate keeps the end token, greedy leaves it out
    result: dict[str, Any] = {
        "prompt_tokens": infer.prompt_tokens(model, prompt), "same_tokens": plain_ids == tokens["reprolora"],
        "load_s": model.load_seconds, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name in times:
        per_token, first = times[name]["full"], times[name]["first"]
        result[name] = {"tokens": len(tokens[name]), "tokens_per_s": 1 / median(per_token), "best_tokens_per_s": 1 / min(per_token),
                        "first_token_s": median(first), "best_first_token_s": min(first),
                        "all_s_per_token": per_token, "all_first_token_s": first}
    for kind in ("full", "first"):
        pairs = zip(times["reprolora"][kind], times["plain"][kind])
        result[f"ratio_{kind}"] = median([a / b for a, b in pairs])  # reprolora's time / plain's time
    return result


def bench_server(adapter: Path, base_dir: Path | None, prompts: list[str], expected: dict[str, list[int]],
                 clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
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
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=600)
    if not port:
        proc.kill()
        sys.exit("server did not start")

    def ask(prompt: str) -> tuple[str, int, dict[str, Any], float]:
        tick = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port[0], timeout=600)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": max_tokens}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        return prompt, response.status, body, time.perf_counter() - tick

    try:
        ask(prompts[0])  # warm-up
        jobs = [prompts[i % len(prompts)] for i in range(clients * requests)]
        tick = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = list(pool.map(ask, jobs))
        wall = time.perf_counter() - tick
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    errors = sum(1 for _, status, _, _ in results if status != 200)
    answers: dict[str, set[tuple[int, ...]]] = {}
    for prompt, status, body, _ in results:
        if status == 200:
            answers.setdefault(prompt, set()).add(tuple(body["choices"][0]["token_ids"]))
    identical = all(len(ids) == 1 for ids in answers.values())
    # With max_tokens <= the probes' length, each answer is a prefix of the golden probe recorded at training.
    match_probes = all(list(next(iter(ids))) == expected[p][:max_tokens] for p, ids in answers.items())
    latencies = sorted(seconds for *_, seconds in results)
    generated = sum(len(body["choices"][0]["token_ids"]) for _, status, body, _ in results if status == 200)
    return {"requests": len(results), "errors": errors, "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": generated / wall, "latency_p50_s": latencies[len(latencies) // 2],
            "latency_max_s": latencies[-1], "identical": identical, "match_probes": match_probes, "exit_code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", default=DEFAULT_ADAPTER, help=f"adapter folder (default: {DEFAULT_ADAPTER})")
    parser.add_argument("--base-model", help="base model folder (default: the built-in default model)")
    parser.add_argument("--prompt", help="prompt to decode (default: the manifest's first probe)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=6, help="pairs of full answers (default: 6)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--server-max-tokens", type=int, default=16)
    args = parser.parse_args()
    adapter = Path(args.adapter)
    base_dir = Path(args.base_model) if args.base_model else None
    probes = manifest.read(adapter).probes.results
    prompt = args.prompt or probes[0].prompt

    d = bench_decoding(adapter, base_dir, prompt, args.max_new_tokens, args.repeats)
    ours, plain = d["reprolora"], d["plain"]
    print(f"machine: {os.cpu_count()} CPUs, torch threads {d['threads']}, cpu capability {d['cpu_capability']}; "
          f"prompt {prompt!r} ({d['prompt_tokens']} tokens), up to {args.max_new_tokens} new tokens, "
          f"{args.repeats} pairs of runs, {args.repeats * FIRST_TOKEN_RUNS} of first tokens; reprolora load (hash checks included) {d['load_s']:.1f} s")
    print(f"{'path':<28} {'tokens':>6} {'tokens/s':>9} {'first token s':>14}   (median; best)")
    for label, r in (("reprolora infer (greedy)", ours), ("transformers+peft generate", plain)):
        print(f"{label:<28} {r['tokens']:6d} {r['tokens_per_s']:9.2f} {r['first_token_s']:14.3f}   "
              f"({r['best_tokens_per_s']:.2f} tokens/s; {r['best_first_token_s']:.3f} s)")
    print(f"reprolora/plain, median of paired runs (target <= 1.0): time per token {d['ratio_full']:.3f}, "
          f"first-token latency {d['ratio_first']:.3f}; same tokens: {'yes' if d['same_tokens'] else 'NO'}")

    s = bench_server(adapter, base_dir, [p.prompt for p in probes], {p.prompt: p.token_ids for p in probes},
                     args.clients, args.requests, args.server_max_tokens)
    print(f"serve: {s['requests']} requests ({args.clients} clients x {args.requests}, max_tokens {args.server_max_tokens}) "
          f"in {s['wall_s']:.1f} s: {s['requests_per_s']:.2f} requests/s, {s['tokens_per_s']:.1f} tokens/s, "
          f"latency p50 {s['latency_p50_s']:.2f} s max {s['latency_max_s']:.2f} s; errors {s['errors']}; "
          f"answers identical: {'yes' if s['identical'] else 'NO'}; equal to the golden probes: "
          f"{'yes' if s['match_probes'] else 'NO'}; exit code after SIGTERM {s['exit_code']}")
    print(json.dumps({"decoding": d, "serve": s}, sort_keys=True))


if __name__ == "__main__":
    main()
