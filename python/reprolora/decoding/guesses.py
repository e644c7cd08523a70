"""The guessed tokens the decoder (reprolora.decoding.generate) puts in a step's idle rows: prompt lookup, as
transformers' `prompt_lookup_num_tokens`, shared out among the sequences of the step."""

from __future__ import annotations

LOOKUP_NGRAM = 3  # a guess follows the latest earlier match of a request's last 3, else 2, else 1 tokens


def lookup(tokens: list[int], limit: int) -> list[int]:
    """`limit` tokens that followed the latest earlier occurrence of the last LOOKUP_NGRAM (else fewer) tokens; where
    they run into the end, the copy goes on over itself, as a repeating pattern would (a loop of one token: that token).
    """
    for n in range(min(LOOKUP_NGRAM, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):  # where an earlier match would end, latest first
            if tokens[end] == suffix[-1] and tokens[end - n + 1 : end + 1] == suffix:
                guesses: list[int] = []
                for at in range(end + 1, end + 1 + limit):
                    guesses.append(tokens[at] if at < len(tokens) else guesses[at - len(tokens)])
                return guesses
    return []


def share_idle_rows(found: list[list[int]], rows: int) -> list[list[int]]:
    """The guesses each of len(found) sequences gets from `found`, its lookups, in the rows - len(found) idle rows of
    a step of `rows` rows: shared out in turn, every sequence's first guess before any second one."""
    guesses: list[list[int]] = [[] for _ in found]
    idle = rows - len(found)
    for turn in range(rows - 1):
        for candidates, guessed in zip(found, guesses, strict=True):
            if idle and turn < len(candidates):
                guessed.append(candidates[turn])
                idle -= 1
    return guesses
