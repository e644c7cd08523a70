"""`reprolora serve` driven by the official `openai` client, as a user would: completions, chat, streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import Server

from conftest import run_cli

openai = pytest.importorskip("openai")

PROMPT = "Why pin seeds?"


@pytest.fixture(scope="module")
def server(tiny_adapter: Path, tiny_base_model: Path) -> Iterator[Server]:
    running = Server(tiny_adapter, tiny_base_model, "--max-tokens", "32", "--max-prompt-tokens", "200")
    yield running
    running.proc.terminate()
    running.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="not-needed", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def test_completions_match_the_cli(client, model_id: str, tiny_adapter: Path, tiny_base_model: Path):
    cli = json.loads(
        run_cli("infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "--json", "-n", "12", PROMPT).stdout
    )
    answer = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.text == cli["text"] and choice.finish_reason == cli["finish_reason"]
    assert choice.model_extra["token_ids"] == cli["token_ids"]
    assert choice.model_extra["logits_sha256"] == cli["logits_sha256"]
    assert answer.usage.completion_tokens == len(cli["token_ids"])


def test_chat_answers_as_the_prompt_does(client, model_id: str):
    completion = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12).choices[0]
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=12)
    assert chat.object == "chat.completion" and chat.model == model_id
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == completion.text
    assert choice.finish_reason == completion.finish_reason
    assert choice.model_extra["logits_sha256"] == completion.model_extra["logits_sha256"]
    newer = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=12
    )
    assert newer.choices[0].message.content == choice.message.content
    assert chat.system_fingerprint == newer.system_fingerprint and chat.system_fingerprint.startswith("fp_")


def test_chat_sees_the_whole_conversation(client, model_id: str):
    alone = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    with_system = client.chat.completions.create(
        model=model_id,
        max_tokens=4,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}],
    )
    # The tiny tokenizer is one token per byte: the template adds the system turn's text to the prompt.
    turn = 2 + len("system\nAnswer briefly.\n")  # <|im_start|>system\n...<|im_end|>\n: two special tokens
    assert with_system.usage.prompt_tokens == alone.usage.prompt_tokens + turn
    parts = client.chat.completions.create(
        model=model_id,
        max_tokens=4,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Why pin "}, {"type": "text", "text": "seeds?"}]}
        ],
    )
    assert parts.choices[0].message.content == alone.choices[0].message.content


def _unstopped(client, model_id: str) -> str:
    text = (
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=16)
        .choices[0]
        .message.content
    )
    assert len(text) >= 6, text
    return text


def test_chat_stop_cuts_the_answer(client, model_id: str):
    text = _unstopped(client, model_id)
    stop = text[3:5]
    stopped = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_the_answer(client, model_id: str):
    whole = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=16
    )
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert len(chunks) > 3  # the text came in pieces, not all at the end
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_with_a_stop_equals_the_answer(client, model_id: str):
    text = _unstopped(client, model_id)
    request = {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "stop": [text[3:5]],
    }
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"


def test_streamed_completion_equals_the_answer(client, model_id: str):
    whole = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12).choices[0]
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices[0].model_extra["logits_sha256"] == whole.model_extra["logits_sha256"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"messages": []}, "'messages' is required"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]: role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: 'content'"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
        ({"messages": [{"role": "user", "content": PROMPT}], "temperature": 0.7}, "temperature"),
        ({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "max_completion_tokens": 4}, "not both"),
        ({"messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 33}, "at most 32"),
        ({"messages": [{"role": "user", "content": "x" * 300}]}, "at most 200"),
        (
            {"messages": [{"role": "user", "content": PROMPT}], "stream_options": {"include_usage": True}},
            "only allowed",
        ),
        ({"messages": [{"role": "user", "content": PROMPT}], "n": 2}, "'n'"),
    ],
)
def test_bad_chat_requests_are_refused(client, model_id: str, fields: dict, message: str):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model_id, **fields)
    assert message in refused.value.body["message"]


def test_unknown_model_and_route_come_from_the_route_table(client, server: Server):
    from reprolora.serving.protocol import ROUTES

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    status, body, _ = server.request("GET", "/v1/nothing")
    assert status == 404
    message = json.loads(body)["error"]["message"]
    assert all(f"{r.method} {r.path}" in message for r in ROUTES)
    usage = run_cli("serve", "--help").stdout
    assert all(r.path in usage for r in ROUTES)
