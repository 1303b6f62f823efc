"""A completion's text as people read it: tokens in, text out, cut at stop strings.

Detokenizing token by token must not print half a character: a character that a byte-level
tokenizer splits over several tokens (an emoji, most CJK text) decodes to U+FFFD until its last
byte arrives, so the text of a token is held back until it decodes whole. Each token's text is the
difference between decoding a short window of tokens with and without it, which keeps the spaces
SentencePiece and byte-level tokenizers attach to the start of a token, and costs the same at every
length (the window starts a few tokens back, within the prompt for the first token).

Stop strings are matched in the text, so across token boundaries. Streaming holds back any end of
the text that could be the start of a stop string, so a stop string never reaches the client; the
pieces streamed add up to exactly the text of the non-streamed response.
"""

from __future__ import annotations

import dataclasses

CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context for the first new token


class Detokenizer:
    """Token ids, one at a time, to the text each adds (empty while a character is incomplete)."""

    def __init__(self, tokenizer, context_ids=()):
        self.decode = tokenizer.decode
        self.ids = [int(i) for i in list(context_ids)[-CONTEXT_TOKENS:]]
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] is the window already printed

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._new_text(final=False)

    def flush(self) -> str:
        """The text of tokens held back (a last character left incomplete), as decode renders it."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


@dataclasses.dataclass
class TokenInfo:
    """One generated token as the API reports it (logprobs)."""

    id: int
    start: int  # offset of its text in the completion
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob) of the most likely tokens, when asked


class Completion:
    """One choice of a request: feed it tokens (`add`), read what may be shown (`release`).

    Finishes with "stop" at an end token (not shown) or a stop string (cut with everything after
    it), with "length" when the caller says the budget is spent (`finish_length`).
    """

    def __init__(self, tokenizer, context_ids=(), stop: tuple[str, ...] = (), end_ids: frozenset[int] = frozenset()):
        self.detokenizer = Detokenizer(tokenizer, context_ids)
        self.stop = tuple(s for s in stop if s)
        self.end_ids = end_ids
        self.text = ""
        self.tokens: list[TokenInfo] = []
        self.generated = 0  # every token the model produced for this choice, end token included
        self.finish_reason: str | None = None
        self._sent_text, self._sent_tokens = 0, 0

    def add(self, token: int, logprob: float = 0.0, top=()) -> bool:
        """Takes the next token; True once the choice is finished."""
        if self.finish_reason is not None:
            return True
        self.generated += 1
        if token in self.end_ids:
            self._finish("stop", self.detokenizer.flush())
            return True
        start = len(self.text)
        self.tokens.append(TokenInfo(int(token), start, float(logprob), list(top)))
        self._append(self.detokenizer.add(token), start)
        return self.finish_reason is not None

    def finish_length(self) -> None:
        """The token budget is spent: the choice ends here (after any text held back)."""
        if self.finish_reason is None:
            self._finish("length", self.detokenizer.flush())

    def _finish(self, reason: str, tail: str) -> None:
        self._append(tail, len(self.text))
        if self.finish_reason is None:
            self.finish_reason = reason

    def _append(self, new: str, search_from: int) -> None:
        if not new:
            return
        longest = max((len(s) for s in self.stop), default=0)
        self.text += new
        start = max(0, search_from - longest + 1)
        hits = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.tokens = [t for t in self.tokens if t.start < cut]
            self.finish_reason = "stop"

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        if self.finish_reason is not None:
            return 0
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def release(self) -> tuple[str, list[TokenInfo]]:
        """The text and tokens not released before that may be shown now."""
        end = len(self.text) - self._held_back()
        text = self.text[self._sent_text : end]
        done = self.finish_reason is not None
        count = len(self.tokens) if done else sum(1 for t in self.tokens if t.start < end)
        count = max(count, self._sent_tokens)
        tokens = self.tokens[self._sent_tokens : count]
        self._sent_text, self._sent_tokens = max(end, self._sent_text), count
        return text, tokens
