import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from reprolora.core.errors import ReproloraError
from reprolora.data import dataset
from reprolora.data.dataset import IGNORE

import tiny


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.write_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    tiny.write_tokenizer(folder, chat_template=False)
    return AutoTokenizer.from_pretrained(folder)


def write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


ALPACA = json.dumps({"instruction": "Why?", "input": "", "output": "Because."})
CHAT = json.dumps(
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ]
    }
)


def test_builtin_dataset_is_one_theme_with_enough_examples():
    data = dataset.load("")
    assert data.name == "default.jsonl" and len(data.conversations) >= 40
    assert all(conv[-1]["content"].startswith("In short: ") for conv in data.conversations)


def test_alpaca_and_chat_lines_load(tmp_path):
    data = dataset.load(str(write_lines(tmp_path, ALPACA, "", CHAT)))
    assert data.conversations[0] == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    assert len(data.conversations[1]) == 5 and data.name == "data.jsonl"


def test_input_joins_the_instruction():
    messages = dataset.parse_line({"instruction": "Fix it", "input": "x = 1", "output": "ok"}, "here")
    assert messages[0]["content"] == "Fix it\n\nx = 1"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"instruction": "a"}', "expected keys instruction/input/output or messages, got ['instruction']"),
        ('{"instruction": "a", "output": 3}', "'output' must be a string"),
        ('{"instruction": "a", "output": "b", "extra": 1}', "expected keys instruction/input/output or messages"),
        ('{"instruction": " ", "output": "b"}', "must not be empty"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of system, user, assistant"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "the last message must be the assistant's"),
        ('{"messages": [{"role": "user"}]}', "must be an object with exactly 'role' and 'content'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, ALPACA, line)
    with pytest.raises(ReproloraError) as error:
        dataset.load(str(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_too_few_examples_and_missing_file(tmp_path):
    with pytest.raises(ReproloraError, match="needs at least 2 examples"):
        dataset.load(str(write_lines(tmp_path, ALPACA)))
    with pytest.raises(ReproloraError, match="dataset file not found"):
        dataset.load(str(tmp_path / "none.jsonl"))


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "\xff", "output": "x"}\n')
    with pytest.raises(ReproloraError, match="not UTF-8"):
        dataset.load(str(path))


@pytest.mark.parametrize("which", ["tokenizer", "plain_tokenizer"])
def test_loss_is_on_the_response_only(which, request):
    tok = request.getfixturevalue(which)
    messages = dataset.parse_line(json.loads(ALPACA), "x")
    encoded = dataset.tokenize(tok, messages, 512, "x")
    prompt = dataset.prompt_ids(tok, messages[:1])
    assert encoded.input_ids[: len(prompt)] == prompt  # inference sees exactly what training saw
    assert all(label == IGNORE for label in encoded.labels[: len(prompt)])
    response = tok.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])
    assert response.startswith("Because.") and tok.eos_token in response


def test_every_assistant_turn_is_learned_and_nothing_else(tokenizer):
    messages = json.loads(CHAT)["messages"]
    encoded = dataset.tokenize(tokenizer, messages, 512, "x")
    learned = tokenizer.decode(
        [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    )
    assert learned == "Hello.<|im_end|>\nBye.<|im_end|>\n"


def test_truncation_that_leaves_no_response_is_an_error(tokenizer):
    messages = dataset.parse_line({"instruction": "x" * 100, "output": "y"}, "x")
    with pytest.raises(ReproloraError, match="no response token fits in max_seq_len=20"):
        dataset.tokenize(tokenizer, messages, 20, "data.jsonl: example 3")


def test_split_is_seeded_and_disjoint():
    train1, eval1 = dataset.split(20, 0.25, random.Random(42))
    train2, eval2 = dataset.split(20, 0.25, random.Random(42))
    assert (train1, eval1) == (train2, eval2)
    assert len(eval1) == 5 and sorted(train1 + eval1) == list(range(20))
    assert dataset.split(20, 0.25, random.Random(43))[1] != eval1
