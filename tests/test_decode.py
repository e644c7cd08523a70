"""The decoding engine (reprolora.decoding.generate): HF's numbers for every family, and answers that do not depend on
what else is decoded with them, in process and through a running `reprolora serve`."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_stops import Counting

from reprolora.data.dataset import prompt_ids
from reprolora.decoding import generate, guesses

import tiny
from conftest import run_cli

PROMPTS = [
    "Why pin seeds?",
    "Why check hashes of every file in the folder?",
    "Hi",
    "Why pin lockfiles, toolchains and caches?",
    "What changes floating-point results on a CPU, and why does the batch matter?",
    "Why?",
    "Check threads.",
    "How do I prove a model came from these inputs?",
]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model of a family with a LoRA adapter on every linear layer, its lora_B random (so it adds something)
    and its linear biases random (initialised to zero, they would hide a product that drops them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprolora.models import families

    made: dict[str, Any] = {}

    def make(family: str) -> tuple[Any, Any]:
        if family not in made:
            folder = tiny.make_family_model(tmp_path_factory.mktemp(family) / "model", family)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            torch.manual_seed(1)
            config = LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=families.preset_modules(family, "all-linear"),
                fan_in_fan_out=family == "gpt2",
            )
            model = get_peft_model(base, config).eval()
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name or (
                        name.endswith(".bias") and parameter.dim() == 1 and "norm" not in name and "ln_" not in name
                    ):
                        parameter.normal_(0, 0.2)
            made[family] = (model, tokenizer)
        return made[family]

    return make


def ids_of(tokenizer: Any, prompt: str) -> list[int]:
    return prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_logits_and_tokens_are_hfs(family_models, family: str) -> None:
    model, tokenizer = family_models(family)
    inner = model.get_base_model()
    engine = generate.Engine(model, tokenizer)
    # Long enough to cross a cache block and the tiny Mistral's sliding window of 64.
    ids = ids_of(tokenizer, PROMPTS[4] + " " + PROMPTS[7])
    new = 24
    logits = []
    sequence = generate.Sequence(ids, new, [], None)
    with torch.inference_mode():
        logits.append(engine._prefill(sequence)[0])
        tokens = [int(torch.argmax(logits[-1]))]
        while len(tokens) < new:
            logits.append(engine._decode([(sequence, tokens[-1], sequence.length)])[0])
            sequence.length += 1
            tokens.append(int(torch.argmax(logits[-1])))
        hf = inner(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :].float()
        generated = inner.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or 0,
        )[0, len(ids) :].tolist()
    assert len(ids) + new > 64
    difference = float((torch.stack(logits) - hf).abs().max())
    assert difference < 1e-5, f"{family}: logits differ from HF's by {difference}"
    assert tokens == generated


def decode_alone(
    engine: generate.Engine, ids: list[int], new: int, stop: list[str] | None = None
) -> generate.Completion:
    sequence = engine.start(ids, new, stop)
    while not sequence.done:
        engine.step([sequence])
    return sequence.completion()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_guesses_in_idle_rows_change_nothing_but_the_number_of_steps(family_models, family: str, monkeypatch) -> None:
    model, tokenizer = family_models(family)
    ids = ids_of(tokenizer, PROMPTS[4] + " " + PROMPTS[7])  # its answer crosses a cache block and Mistral's window
    one_a_step = generate.Engine(model, tokenizer, guess=False)
    want = decode_alone(one_a_step, ids, 40)
    assert want.finish_reason == "length" and len(want.token_ids) == 40 and one_a_step.steps == 39
    looked_up = generate.Engine(model, tokenizer)
    assert decode_alone(looked_up, ids, 40) == want
    assert looked_up.accepted > 0 and looked_up.steps < one_a_step.steps
    # Guesses drawn at random from the answer so far and the prompt's last 3 tokens: right ones and wrong ones.
    monkeypatch.setattr(
        generate, "lookup", lambda tokens, limit: random.Random(len(tokens)).choices(tokens[len(ids) - 3 :], k=limit)
    )
    guessing = generate.Engine(model, tokenizer)
    assert decode_alone(guessing, ids, 40) == want
    assert 0 < guessing.accepted < guessing.guessed
    # A stop string met among a step's accepted guesses ends the answer where one token a step ends it.
    stop = tokenizer.decode(want.token_ids[20:22], skip_special_tokens=True)
    stopped = decode_alone(one_a_step, ids, 40, [stop])
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 40
    for engine in (looked_up, guessing):
        assert decode_alone(engine, ids, 40, [stop]) == stopped


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_stop_string_ends_the_answer_where_the_whole_answer_first_holds_it(family_models, family: str) -> None:
    """Stop strings are looked for in the last few tokens only (reprolora.decoding.stops): the answer ends at the
    token where decoding the whole answer again would first find one, across tokens and inside characters, and the
    check decodes each token a few times, not the whole answer at every token."""
    model, tokenizer = family_models(family)
    ids = ids_of(tokenizer, PROMPTS[4])
    free = decode_alone(generate.Engine(model, tokenizer), ids, 120)
    tokens, text = free.token_ids, free.text
    assert len(tokens) == 120

    def whole(k: int) -> str:
        return tokenizer.decode(tokens[:k], skip_special_tokens=True)

    middle = len(text) // 2
    for stops in ([text[middle : middle + 2]], [text[-3:], "never there"], [whole(61)[-1:] + "\ufffd"]):
        counting = Counting(tokenizer)
        got = decode_alone(generate.Engine(model, counting), ids, 120, stops)
        end = next((k for k in range(1, 121) if any(s in whole(k) for s in stops)), 120)
        cut = min((whole(end).find(s) for s in stops if s in whole(end)), default=len(whole(end)))
        assert (got.token_ids, got.text) == (tokens[:end], whole(end)[:cut]), stops
        assert got.finish_reason == ("stop" if any(s in whole(end) for s in stops) else "length")
        assert counting.decoded < 10 * end, counting.decoded  # the whole answer at every token: end**2 / 2


def test_a_weight_changed_in_place_after_decoding_is_used(tmp_path: Path) -> None:
    """Decoding steps use packed copies of the weights (kernels.PackedWeights), which the engine holds, not the
    modules: one changed in place afterwards (an optimizer step, say) must be packed again, not decoded with its old
    copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny.make_family_model(tmp_path / "model", "gpt2")  # its attention and output products are packed
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def change(model: Any) -> Any:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.5)
            model.transformer.h[0].attn.c_attn.weight.mul_(2.0)
        return model

    model = load()
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    engine = generate.Engine(model, tokenizer, guess=False)
    ids = ids_of(tokenizer, PROMPTS[1])
    before = decode_alone(engine, ids, 12)
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes  # the engine's own
    change(model)
    after = decode_alone(engine, ids, 12)
    assert after == decode_alone(generate.Engine(change(load()), tokenizer, guess=False), ids, 12)
    assert after.logits_sha256 != before.logits_sha256


@pytest.mark.skipif(platform.machine() != "x86_64", reason="oneDNN's packed products are used on x86-64 only")
def test_packed_products_under_every_profile_but_portable() -> None:
    """`portable` promises the same bytes on Intel and AMD through MKL's COMPATIBLE path: its decoder keeps MKL."""
    code = (
        "import sys; from reprolora.core import pins; pins.apply(sys.argv[1], 1); "
        "from reprolora.decoding import kernels; "
        "print(kernels.packs_weights())"
    )
    used = {
        profile: subprocess.run(
            [sys.executable, "-c", code, profile], capture_output=True, text=True, check=True, timeout=300
        ).stdout.strip()
        for profile in ("native", "portable-fast", "portable")
    }
    assert used == {"native": "True", "portable-fast": "True", "portable": "False"}


def test_idle_rows_are_shared_first_guesses_first() -> None:
    assert generate.SLOTS == 8
    share = guesses.share_idle_rows
    assert share([list(range(10, 17))], 8) == [list(range(10, 17))]  # one sequence: 7 idle rows
    assert share([[1, 2, 3], [4, 5, 6], []], 8) == [[1, 2, 3], [4, 5], []]  # 5 idle rows
    assert share([[1, 2]] * 6, 8) == [[1], [1], [], [], [], []]  # 2 idle rows
    assert share([[1, 2]] * 8, 8) == [[]] * 8  # none idle


def test_lookup_guesses_what_followed_the_latest_match() -> None:
    assert guesses.lookup([5, 1, 2, 3, 9, 1, 2, 3, 4, 7, 1, 2, 3], 3) == [4, 7, 1]  # the latest of two matches
    assert guesses.lookup([1, 2, 3, 8, 2, 3], 5) == [8, 2, 3, 8, 2]  # no 3-token match: the 2-token one, repeated
    assert guesses.lookup([6, 4, 4], 3) == [4, 4, 4]
    assert guesses.lookup([4, 5, 6], 2) == []
    assert guesses.lookup([1, 2, 1, 2], 0) == []


def run_staggered(engine: generate.Engine, requests: list[tuple[int, list[int], int]]) -> list[generate.Completion]:
    """Decode `requests` (arrival step, prompt ids, max new tokens) as a server does: arrivals join the running
    batch."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    active: list[tuple[int, generate.Sequence]] = []
    done: dict[int, generate.Completion] = {}
    tick = 0
    while pending or active:
        while pending and requests[pending[0]][0] <= tick and len(active) < generate.SLOTS:
            number = pending.pop(0)
            sequence = engine.start(requests[number][1], requests[number][2])
            if sequence.done:
                done[number] = sequence.completion()
            else:
                active.append((number, sequence))
        if active:
            engine.step([s for _, s in active])
            for number, sequence in active:
                if sequence.done:
                    done[number] = sequence.completion()
            active = [(n, s) for n, s in active if not s.done]
        tick += 1
    return [done[i] for i in range(len(requests))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("others", [1, 3, 7])
def test_an_answer_does_not_depend_on_the_others(family_models, family: str, others: int) -> None:
    model, tokenizer = family_models(family)
    engine = generate.Engine(model, tokenizer)
    target = ids_of(tokenizer, PROMPTS[0])
    alone = generate.greedy(generate.Engine(model, tokenizer), PROMPTS[0], 20)
    assert alone.token_ids and alone.finish_reason == "length"
    # Others of various lengths, arriving before, with and after the target, some finishing while it decodes.
    for target_arrives in (0, 3):
        requests = [(target_arrives, target, 20)]
        requests += [((k * 2) % 7, ids_of(tokenizer, PROMPTS[1 + k % 7]), 5 + 7 * k % 23) for k in range(others)]
        results = run_staggered(engine, requests)
        assert results[0] == alone, f"target arriving at step {target_arrives} among {others} others"
        for (_, ids, new), got in zip(requests[1:], results[1:], strict=True):
            assert got == run_staggered(engine, [(0, ids, new)])[0]


def test_start_and_step_refuse_what_they_cannot_do(family_models) -> None:
    model, tokenizer = family_models("llama")
    engine = generate.Engine(model, tokenizer)
    empty = engine.start(ids_of(tokenizer, "Hi"), 0)
    assert empty.done and empty.completion().token_ids == []
    with pytest.raises(ValueError):
        engine.step([empty])
    sequences = [engine.start(ids_of(tokenizer, "Hi"), 4) for _ in range(generate.SLOTS + 1)]
    with pytest.raises(ValueError):
        engine.step(sequences)


def test_served_concurrently_equals_infer_alone(tiny_adapter: Path, tiny_base_model: Path) -> None:
    from test_serve import Server

    prompts = PROMPTS[:4]
    alone = {}
    for prompt in prompts:
        alone[prompt] = json.loads(
            run_cli(
                "infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "--json", prompt, "-n", "12"
            ).stdout
        )
    server = Server(tiny_adapter, tiny_base_model)
    try:
        jobs = [prompts[i % len(prompts)] for i in range(24)]

        def ask(prompt: str) -> tuple[str, dict[str, Any]]:
            return prompt, server.complete(prompt=prompt, max_tokens=12)["choices"][0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(ask, jobs))
        metrics = server.request("GET", "/metrics")[1].decode()
    finally:
        assert server.stop() == 0
    for prompt, choice in answers:
        want = alone[prompt]
        assert (choice["token_ids"], choice["text"], choice["logits_sha256"]) == (
            want["token_ids"],
            want["text"],
            want["logits_sha256"],
        ), prompt
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    probe = manifest["probes"]["results"][0]
    assert alone[probe["prompt"]]["token_ids"][:8] == probe["token_ids"]
    counters = {
        name: int(value)
        for name, value in (
            line.split() for line in metrics.splitlines() if line.startswith("reprolora_") and "{" not in line
        )
    }
    assert counters["reprolora_decode_rows_total"] > counters["reprolora_decode_steps_total"] > 0  # several together
    assert counters["reprolora_guessed_tokens_total"] >= counters["reprolora_accepted_guesses_total"]
    # Each request's prompt pass and each of its rows gives a token, kept unless it is the end token ("stop").
    ended = sum(choice["finish_reason"] == "stop" for _, choice in answers)
    assert counters["reprolora_completion_tokens_total"] == (
        len(jobs) + counters["reprolora_decode_rows_total"] + counters["reprolora_accepted_guesses_total"] - ended
    )


def test_bench_infer_quick_runs(tiny_adapter: Path, tiny_base_model: Path) -> None:
    bench = Path(__file__).resolve().parent.parent / "python" / "benchmarks" / "bench_infer.py"
    result = subprocess.run(
        [sys.executable, str(bench), str(tiny_adapter), "--base-model", str(tiny_base_model), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory bandwidth" in result.stdout and "serve:" in result.stdout, result.stdout
    assert "identical to alone: yes" in result.stdout, result.stdout


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_reference_engine_answers_as_the_training_forward_alone_batched_or_guessing(family_models, family) -> None:
    """Under `reference` each step's logits are, bit for bit, the reference decoder's forward over the whole
    sequence at that position (the one training and the golden probes run), whatever else the step holds and
    whether idle rows guess."""
    from reprolora.decoding.reference import ReferenceEngine
    from reprolora.models.reference import Decoder

    model, tokenizer = family_models(family)
    ids = ids_of(tokenizer, PROMPTS[4] + " " + PROMPTS[7])  # crosses a cache block and Mistral's window of 64
    plain = ReferenceEngine(model, tokenizer, guess=False)
    sequence = generate.Sequence(ids, 24, [], None)
    assert len(ids) + 24 > 64
    with torch.inference_mode():
        logits = [plain._prefill(sequence)[0]]
        tokens = [int(torch.argmax(logits[-1]))]
        while len(tokens) < 24:
            logits.append(plain._decode([(sequence, tokens[-1], sequence.length)])[0])
            sequence.length += 1
            tokens.append(int(torch.argmax(logits[-1])))
        decoder = Decoder(model)
        everything = ids + tokens[:-1]
        whole = decoder.logits(decoder.hidden(torch.tensor(everything), [len(everything)]))[len(ids) - 1 :]
    assert torch.equal(torch.stack(logits), whole)

    assert decode_alone(plain, ids, 12).token_ids == tokens[:12]
    want = {p: decode_alone(plain, ids_of(tokenizer, p), 12) for p in PROMPTS[:5]}
    batched = ReferenceEngine(model, tokenizer)  # guessing in its idle rows
    sequences = {p: batched.start(ids_of(tokenizer, p), 12) for p in want}
    while any(not s.done for s in sequences.values()):
        batched.step([s for s in sequences.values() if not s.done])
    assert {p: s.completion() for p, s in sequences.items()} == want
    assert batched.guessed > 0
