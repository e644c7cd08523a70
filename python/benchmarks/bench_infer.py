"""Benchmark: `reprolora infer`'s decoding against plain transformers + peft `generate`, the memory-bandwidth bound,
and `serve` under load.

Part 1, in this process: the adapter is loaded twice, once by reprolora.decoding.infer (hash checks, pins, PeftModel)
and once the plain way (AutoModelForCausalLM + PeftModel.from_pretrained, no checks); each answers the same prompt
greedily, in `--repeats` back-to-back rounds (each path first in turn), as does reprolora's engine with its idle
rows left empty (no guesses: one token a step). All run under the adapter's determinism pins, which this process
applies before torch loads, so the comparison is between the decoding paths. Reported: tokens/s over a full answer
(tokenizing the prompt included), first-token latency (a run with one new token: prompt in, first token out), the
median over rounds of plain generate's time / reprolora's time (the speed-up; target >= 2), and how many tokens
a decoding step gave and how many guesses were right. For an adapter of profile `reference` (decoded by the
reference engine), the native engine over the same weights runs too, as the baseline of `reference / native
decoding time R`.

Part 2, the bound: the memory bandwidth measured here (best of summing a large tensor), the weight bytes one
decoding step reads, and what they allow: bandwidth / bytes = tokens/s at best for one request; and how much of it
reprolora reaches.

Part 3 (serve_load.py): `reprolora serve` in a subprocess, `--clients` concurrent clients on loopback sending
`--requests` each (the manifest's probe prompts in turn), against one client sending the same requests one after
another, and against plain generate answering them serially in this process. Reported: requests/s, generated
tokens/s, p50 and p99 latency; every concurrent answer must be identical (tokens and logits hash) to the one-client
answer for its prompt, and its tokens to the golden probe recorded at training.

    python python/benchmarks/bench_infer.py [ADAPTER] [--base-model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from serve_load import bench_server, percentiles  # this folder's part 3 (a script's own folder is on sys.path)

from reprolora.core import manifest  # no torch: the pins still come first

DEFAULT_ADAPTER = "out/adapter"
FIRST_TOKEN_RUNS = 4  # per repeat and path


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_decoding(
    adapter: Path,
    base_dir: Path | None,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    serve_jobs: list[str],
    serve_max_tokens: int,
) -> dict[str, Any]:
    from reprolora.decoding import infer

    model = infer.load(adapter, base_dir)  # applies the adapter's pins: torch is imported after this line
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The plain way, as a transformers + peft user writes it.
    plain_tokenizer = AutoTokenizer.from_pretrained(model.base_folder)
    plain_base = AutoModelForCausalLM.from_pretrained(model.base_folder, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain_base, str(adapter)).eval()

    def plain_generate(n: int, text: str = prompt) -> list[int]:
        inputs = plain_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            # Only the ids and mask: older tokenizers also return token_type_ids, which generate refuses.
            output = plain.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=plain_tokenizer.pad_token_id or plain_tokenizer.eos_token_id,
            )
        return output[0, inputs["input_ids"].shape[1] :].tolist()

    from reprolora.decoding import generate

    engine = model.engine
    one_a_step = type(engine)(model.causal_lm, model.tokenizer, guess=False)
    # A `reference` adapter decodes with the reference engine; the native engine over the same weights is its baseline.
    native = generate.Engine(model.causal_lm, model.tokenizer) if type(engine) is not generate.Engine else None

    def ours(n: int) -> list[int]:
        return infer.complete(model, prompt, n).token_ids

    def decoded_by(decoder: generate.Engine) -> Any:
        """The prompt's answer of `n` tokens, one `decoder.step` after another."""

        def answer(n: int) -> list[int]:
            sequence = decoder.start(generate.request_ids(model.tokenizer, prompt), n)
            while not sequence.done:
                decoder.step([sequence])
            return sequence.generated

        return answer

    ours_one_a_step = decoded_by(one_a_step)  # the same engine without guesses in its idle rows

    def timed(fn: Any, n: int) -> tuple[float, list[int]]:
        tick = time.perf_counter()
        ids = fn(n)
        return time.perf_counter() - tick, ids

    paths = [("reprolora", ours), ("one_a_step", ours_one_a_step), ("plain", plain_generate)]
    if native is not None:
        paths.append(("native_engine", decoded_by(native)))
    for _, fn in paths:  # warm-up: first calls pay for lazy initialisation
        fn(2)
    times: dict[str, dict[str, list[float]]] = {name: {"full": [], "first": []} for name, _ in paths}
    tokens: dict[str, list[int]] = {}
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
    # Tokens per decoding step on the full answer (the first token comes from the prompt's own pass).
    engine.steps = engine.rows = engine.accepted = engine.guessed = 0
    ours(max_new_tokens)
    guessing = {
        "steps": engine.steps,
        "tokens": engine.rows + engine.accepted,
        "guessed": engine.guessed,
        "accepted": engine.accepted,
    }
    eos = set(filter(None, [plain_tokenizer.eos_token_id]))
    plain_ids = [t for t in tokens["plain"] if t not in eos]  # generate keeps the end token, greedy leaves it out
    result: dict[str, Any] = {
        "prompt_tokens": len(generate.request_ids(model.tokenizer, prompt)),
        "same_tokens": plain_ids == tokens["reprolora"] == tokens["one_a_step"],
        "guessing": guessing,
        "load_s": model.load_seconds,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name in times:
        per_token, first = times[name]["full"], times[name]["first"]
        result[name] = {
            "tokens": len(tokens[name]),
            "tokens_per_s": 1 / median(per_token),
            "best_tokens_per_s": 1 / min(per_token),
            "first_token_s": median(first),
            "best_first_token_s": min(first),
            "all_s_per_token": per_token,
            "all_first_token_s": first,
        }
    for kind in ("full", "first"):
        pairs = zip(times["reprolora"][kind], times["plain"][kind], strict=True)
        result[f"speedup_{kind}"] = median([b / a for a, b in pairs])  # plain's time / reprolora's time
        pairs = zip(times["reprolora"][kind], times["one_a_step"][kind], strict=True)
        result[f"guess_speedup_{kind}"] = median([b / a for a, b in pairs])
        if native is not None:  # reference / native decoding time
            pairs = zip(times["reprolora"][kind], times["native_engine"][kind], strict=True)
            result[f"reference_over_native_{kind}"] = median([a / b for a, b in pairs])
    result["bound"] = bandwidth_bound(model.causal_lm)
    result["bound"]["reached"] = result["reprolora"]["tokens_per_s"] / result["bound"]["tokens_per_s"]
    result["plain_serial"] = plain_serially(plain_generate, serve_jobs, serve_max_tokens)
    return result


def plain_serially(plain_generate: Any, jobs: list[str], max_tokens: int) -> dict[str, Any]:
    """Plain generate answering the server's requests one after another: what a one-request-at-a-time server does."""
    latencies, generated = [], 0
    tick = time.perf_counter()
    for prompt in jobs:
        started = time.perf_counter()
        generated += len(plain_generate(max_tokens, prompt))
        latencies.append(time.perf_counter() - started)
    wall = time.perf_counter() - tick
    return {
        "requests": len(jobs),
        "wall_s": wall,
        "requests_per_s": len(jobs) / wall,
        "tokens_per_s": generated / wall,
        **percentiles(latencies),
    }


def memory_bandwidth(megabytes: int = 1024, rounds: int = 5) -> float:
    """Bytes per second this machine reads: best of summing a float32 tensor much larger than any cache."""
    import torch

    data = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(rounds):
        tick = time.perf_counter()
        float(data.sum())
        best = min(best, time.perf_counter() - tick)
    return data.numel() * 4 / best


def bandwidth_bound(causal_lm: Any) -> dict[str, float]:
    """Weight bytes one decoding step reads (every parameter, the input embedding once per token unless it is also
    the output head) and the tokens/s that the measured bandwidth allows at best."""
    embedding = causal_lm.get_input_embeddings().weight
    tied = embedding is causal_lm.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in causal_lm.parameters())
    per_token = (
        total
        if tied
        else total - embedding.numel() * embedding.element_size() + embedding[0].numel() * embedding.element_size()
    )
    bandwidth = memory_bandwidth()
    return {
        "bandwidth_bytes_per_s": bandwidth,
        "weight_bytes_per_token": per_token,
        "tokens_per_s": bandwidth / per_token,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "adapter", nargs="?", default=DEFAULT_ADAPTER, help=f"adapter folder (default: {DEFAULT_ADAPTER})"
    )
    parser.add_argument("--base-model", help="base model folder (default: the built-in default model)")
    parser.add_argument("--prompt", help="prompt to decode (default: the manifest's first probe)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=6, help="pairs of full answers (default: 6)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    parser.add_argument("--server-max-tokens", type=int, default=32)
    parser.add_argument(
        "--quick", action="store_true", help="a short run (for the tests): 1 pair, 8 new tokens, 1 request per client"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.max_new_tokens, args.requests, args.server_max_tokens = 1, 8, 1, 8
    adapter = Path(args.adapter)
    base_dir = Path(args.base_model) if args.base_model else None
    probes = manifest.read(adapter).probes.results
    prompt = args.prompt or probes[0].prompt
    jobs = [probes[i % len(probes)].prompt for i in range(args.clients * args.requests)]

    d = bench_decoding(adapter, base_dir, prompt, args.max_new_tokens, args.repeats, jobs, args.server_max_tokens)
    ours, plain, bound = d["reprolora"], d["plain"], d["bound"]
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {d['threads']}, cpu capability {d['cpu_capability']}; "
        f"prompt {prompt!r} ({d['prompt_tokens']} tokens), up to {args.max_new_tokens} new tokens, "
        f"{args.repeats} pairs of runs, {args.repeats * FIRST_TOKEN_RUNS} of first tokens; "
        f"reprolora load (hash checks included) {d['load_s']:.1f} s"
    )
    print(f"{'path':<28} {'tokens':>6} {'tokens/s':>9} {'first token s':>14}   (median; best)")
    for label, r in (
        ("reprolora infer (greedy)", ours),
        ("reprolora, no guesses", d["one_a_step"]),
        ("transformers+peft generate", plain),
    ):
        print(
            f"{label:<28} {r['tokens']:6d} {r['tokens_per_s']:9.2f} {r['first_token_s']:14.3f}   "
            f"({r['best_tokens_per_s']:.2f} tokens/s; {r['best_first_token_s']:.3f} s)"
        )
    print(
        f"speed-up over plain generate, median of paired runs (target >= 2): per token {d['speedup_full']:.2f}x, "
        f"first token {d['speedup_first']:.2f}x; same tokens: {'yes' if d['same_tokens'] else 'NO'}"
    )
    if "reference_over_native_full" in d:
        print(
            f"reference / native decoding time R (the native engine over the same weights, median of paired runs): "
            f"per token {d['reference_over_native_full']:.1f}, first token {d['reference_over_native_first']:.1f}"
        )
    g = d["guessing"]
    print(
        f"guesses in idle rows: {g['tokens']} tokens in {g['steps']} decoding steps "
        f"({g['tokens'] / max(1, g['steps']):.2f} a step), "
        f"{g['accepted']} of {g['guessed']} guesses right; speed-up over the same engine without guesses "
        f"{d['guess_speedup_full']:.2f}x per token"
    )
    print(
        f"memory bandwidth {bound['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (sum of a 1 GiB tensor, best of 5); "
        f"{bound['weight_bytes_per_token'] / 1e6:.1f} MB of weights read per token: bound {bound['tokens_per_s']:.1f} "
        f"tokens/s for one request; reprolora reaches {100 * bound['reached']:.0f}%"
    )

    s = bench_server(
        adapter, base_dir, jobs, {p.prompt: p.token_ids for p in probes}, args.clients, args.server_max_tokens
    )
    rows = [
        (f"serve, {args.clients} clients", s["together"]),
        ("serve, 1 client", s["alone"]),
        ("plain generate, serially", d["plain_serial"]),
    ]
    print(f"serve: {len(jobs)} requests, max_tokens {args.server_max_tokens}")
    print(f"{'run':<26} {'requests/s':>10} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for label, r in rows:
        print(
            f"{label:<26} {r['requests_per_s']:10.2f} {r['tokens_per_s']:9.1f} "
            f"{r['latency_p50_s']:7.2f} {r['latency_p99_s']:7.2f}"
        )
    together = s["together"]["requests_per_s"]
    print(
        f"serve: {args.clients} clients / 1 client {together / s['alone']['requests_per_s']:.2f}x, / plain generate "
        f"serially {together / d['plain_serial']['requests_per_s']:.2f}x, / the 0.74 requests/s before batching "
        f"{together / 0.74:.2f}x; errors {s['together']['errors'] + s['alone']['errors']}; answers identical to alone: "
        f"{'yes' if s['identical_to_alone'] else 'NO'}; "
        f"equal to the golden probes: {'yes' if s['match_probes'] else 'NO'}; "
        f"exit code after SIGTERM {s['exit_code']}"
    )
    print(json.dumps({"decoding": d, "serve": s}, sort_keys=True))


if __name__ == "__main__":
    main()
