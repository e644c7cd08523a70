"""An answer's text as it grows a token at a time, for its stop strings (reprolora.decoding.generate) and its stream
(reprolora.serving.scheduler): each token costs the decoding of the last few tokens, where decoding the whole answer
again at every token costs its length, and the answer the square of it.

decode(ids) is kept as `settled + tail`: `settled` the text of ids[:read], which no later token changes, and `tail`
the text of the tokens after, which waits for the token that completes its last character (it ends in "\ufffd").
Each update decodes only the window ids[start:], `start` being where the latest settled piece began, and takes what
follows the text of ids[start:read]: that piece of context keeps each token's text as it is in the whole answer
(a SentencePiece text drops the space its first token starts with; byte-level and byte-fallback tokens split a
character between them). A window whose text does not start with its context's is a tokenizer whose earlier text
can change (as transformers' clean_up_tokenization_spaces does, known up front): from there on the whole answer is
decoded at each token, as before, and nothing settles. So does a run of tokens that never completes a character
(invalid bytes), until one does.

A stop string in decode(ids) lies in the settled text, checked when that text settled, or ends in the tail: each
check looks at the tail and the last len(stop) - 1 settled characters before it.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # the decoders' stand-in for bytes that are not (yet) a whole character


class AnswerText:
    """decode(ids, skip_special_tokens=True) of a growing answer, as `settled + tail` (module docstring)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.reach = max(0, max((len(s) for s in stops), default=0) - 1)  # settled characters a stop can start in
        self.whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))  # decode everything each time
        self.start = 0  # the window decoded at each update is ids[start:]
        self.read = 0  # ids[:read] are settled
        self.context = ""  # the text of ids[start:read]
        self.recent = ""  # the last `reach` settled characters
        self.tail = ""
        self.stop_settled = False  # a stop string lies in the settled text

    def update(self, ids: list[int]) -> str:
        """Take the answer's ids (the last update's and more after them); returns the text this settled."""
        window = self._decode(ids[self.start :])
        if not self.whole and not window.startswith(self.context):
            self.whole, self.start, self.read, self.context, self.recent = True, 0, 0, "", ""
            self.stop_settled = False
            window = self._decode(ids)
        new = window[len(self.context) :]
        if self.whole or not new or new.endswith(INCOMPLETE):
            self.tail = new
            return ""
        near = self.recent + new
        self.stop_settled = self.stop_settled or self._stop_in(near)
        self.recent = near[max(0, len(near) - self.reach) :] if self.reach else ""
        self.tail = ""
        piece, self.read = self.read, len(ids)
        context = self._decode(ids[piece : self.read])
        if context:  # else the window keeps its start: a context with no text would show no change to it
            self.start = piece
        self.context = context if context else self._decode(ids[self.start : self.read])
        return new

    @property
    def pending(self) -> bool:
        """Whether the text ends in a character that is not complete yet."""
        return self.tail.endswith(INCOMPLETE)

    @property
    def has_stop(self) -> bool:
        """Whether a stop string lies in the text."""
        return self.stop_settled or self._stop_in(self.recent + self.tail)

    def _stop_in(self, text: str) -> bool:
        return any(s in text for s in self.stops)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def cut(text: str, stops: list[str]) -> str:
    """`text` up to the earliest stop string in it (all of it where there is none)."""
    at = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:at] if at >= 0 else text
