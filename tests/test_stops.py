"""An answer's text decoded a few tokens at a time (reprolora.decoding.stops): at every token the same text, the same
stop found and the same streamed text as decoding the whole answer again, at a cost linear in the answer's length."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from reprolora.decoding.stops import AnswerText, cut
from reprolora.serving.scheduler import TextStream

import tiny

LONG = "Stop strings, checked as the answer grows: héllo wörld ✓ 日本語 — ünïcode. " * 40


class Counting:
    """`tokenizer`, counting the ids it decodes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny models' tokenizer: byte-level, one token per byte, so a character can span up to 4 tokens."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tiny.write_tokenizer(Path(folder))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def byte_fallback() -> Any:
    """A SentencePiece-style tokenizer as Llama 2's and Mistral's: "▁" for a space, the text's first space dropped,
    byte tokens (<0xE2>) for what its vocabulary lacks, merged into characters where they make one."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁the", "▁cat", "▁", "s", "at", "é", "▁ST", "OP", "日本", "語"]
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(pieces)})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>")


def ids_of(tokenizer: Any, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def check_every_step(tokenizer: Any, ids: list[int], stops: list[str]) -> None:
    """At each token, the incremental text, its incomplete end and its stop are the whole answer's."""
    text = AnswerText(tokenizer, stops)
    settled = ""
    for k in range(1, len(ids) + 1):
        settled += text.update(ids[:k])
        whole = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert (text.tail if text.whole else settled + text.tail) == whole, k
        assert text.pending == whole.endswith("\ufffd"), k
        assert text.has_stop == any(s in whole for s in stops), (k, whole)


def test_byte_level_characters_and_stops_across_tokens(byte_level) -> None:
    ids = byte_level(LONG[:400], add_special_tokens=False)["input_ids"]
    assert len(ids) > len(LONG[:400])  # multi-byte characters are several tokens
    for stops in (["本語 —"], ["ö"], ["grows: h", "never"], ["✓ 日"], ["\ufffd"], ["wörld ✓ 日本語 — ünïcode. Stop"]):
        check_every_step(byte_level, ids, stops)
    for seed in range(20):  # any bytes at all: invalid ones, lone halves of characters, special tokens
        drawn = random.Random(seed).choices(range(len(byte_level)), k=60)
        check_every_step(byte_level, drawn, ["\ufffdA", "a", "\ufffd"])
    # A stop string that starts in one token and ends in the next: found at the token that completes it.
    text = AnswerText(byte_level, ["ab"])
    text.update(ids_of(byte_level, ["a"]))
    assert not text.has_stop
    text.update(ids_of(byte_level, ["a", "b"]))
    assert text.has_stop


def test_byte_fallback_pieces_and_the_dropped_first_space(byte_fallback) -> None:
    tokens = ["▁the", "▁cat", "<0xE2>", "<0x9C>", "<0x93>", "▁ST", "OP", "</s>", "s", "日本", "<0xE8>", "<0xAA>"]
    tokens += ["<0x9E>", "▁", "at", "é", "<0xFF>", "s", "<0xC3>", "<0xA9>", "▁the"]
    ids = ids_of(byte_fallback, tokens)
    assert byte_fallback.decode(ids[:2]) == "the cat"
    for stops in (["STOP"], ["cat✓"], [" ST", "OP"], ["本語"], ["\ufffds"], ["é the"]):
        check_every_step(byte_fallback, ids, stops)
    everything = list(range(len(byte_fallback)))
    for seed in range(20):  # any ids at all: invalid bytes, lone halves of characters, special tokens
        drawn = random.Random(seed).choices(everything, k=60)
        check_every_step(byte_fallback, drawn, ["é", "at t", "\ufffd"])


class Chars:
    """One character per id."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class Tidying:
    """A decoder whose earlier text changes as tokens follow, as transformers' clean_up_tokenization_spaces does."""

    def __init__(self, flagged: bool) -> None:
        if flagged:
            self.clean_up_tokenization_spaces = True

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids)).replace(" .", ".").replace(" ,", ",")


@pytest.mark.parametrize("flagged", [True, False])
def test_a_tokenizer_whose_text_changes_is_decoded_whole(flagged: bool) -> None:
    ids = [ord(c) for c in "one , two . three .four"]
    check_every_step(Tidying(flagged), ids, [", two.", "e ."])
    text = AnswerText(Tidying(flagged), [])
    for k in range(1, len(ids) + 1):
        text.update(ids[:k])
    assert text.whole


def test_a_long_answers_stop_check_decodes_each_token_a_few_times(byte_level) -> None:
    counting = Counting(byte_level)
    ids = byte_level(LONG, add_special_tokens=False)["input_ids"]
    text = AnswerText(counting, ["never there", "日本語 — ünïcode. Stop strings, checked as the answer grows: héllo"])
    found = []
    for k in range(1, len(ids) + 1):
        text.update(ids[:k])
        found.append(text.has_stop)
    assert len(ids) > 3000
    assert counting.decoded < 8 * len(ids)  # decoding the whole answer at every token: len(ids)**2 / 2
    first = found.index(True)
    assert not any(found[:first]) and all(found[first:])
    assert first == len(byte_level(LONG[: LONG.index("héllo", 100) + 5], add_special_tokens=False)["input_ids"]) - 1


def whole_stream(tokenizer: Any, ids: list[int], stops: list[str], final: str) -> list[str]:
    """What TextStream sends, by decoding the whole answer at every token."""
    hold = max((len(s) - 1 for s in stops), default=0)
    deltas, sent = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if text.endswith("\ufffd") or any(s in text for s in stops):
            if any(s in text for s in stops):
                break
            continue
        if len(text) - hold > len(sent):
            deltas.append(text[len(sent) : len(text) - hold])
            sent = text[: len(text) - hold]
    if final.startswith(sent) and len(final) > len(sent):
        deltas.append(final[len(sent) :])
    return deltas


@pytest.mark.parametrize("stops", [[], ["本語 —"], ["ö"], ["ünïcode. S", "✓"], ["Stop strings, checked as"]])
def test_the_stream_sends_what_decoding_the_whole_answer_would(byte_level, stops: list[str]) -> None:
    ids = byte_level(LONG[:300], add_special_tokens=False)["input_ids"]
    whole = byte_level.decode(ids)
    ended = next((k for k in range(1, len(ids) + 1) if any(s in byte_level.decode(ids[:k]) for s in stops)), len(ids))
    final = cut(byte_level.decode(ids[:ended]), stops)
    sent: list[str] = []
    stream = TextStream(byte_level, stops, sent.append)
    for k in range(1, ended + 1):
        stream.on_token(ids[:k])
    stream.finish(final)
    assert sent == whole_stream(byte_level, ids[:ended], stops, final)
    assert "".join(sent) == final and (final == whole) == (not stops or ended == len(ids))


def streamed(stops: list[str], answer: str, final: str) -> list[str]:
    """What TextStream sends of `answer`, one character per token, decoding stopped at the first stop string, and
    `final`, the answer's text cut at it."""
    sent: list[str] = []
    stream = TextStream(Chars(), stops, sent.append)
    ids: list[int] = []
    for char in answer:
        ids.append(ord(char))
        stream.on_token(ids)
        if any(s in "".join(map(chr, ids)) for s in stops):
            break  # greedy stops decoding here
    stream.finish(final)
    return sent


def test_the_stream_holds_back_text_shorter_than_a_stop() -> None:
    """Two characters of a seven-character stop string are no text to send yet: the stop may cut them."""
    assert streamed(["abcdefg"], "abcdefg", "") == []


def test_text_stream_never_sends_text_that_a_stop_would_cut() -> None:
    sent = streamed(["STOP"], "one two STOP three", "one two ")
    assert "".join(sent) == "one two " and len(sent) > 2
    assert all("S" not in piece for piece in sent)
