"""Incremental text of one choice, with OpenAI stop strings (trimmed from the output)."""

from __future__ import annotations


class TextStream:
    """`push(token) -> (text, stopped)` releases the text that can no longer become part of a stop
    string; when one appears, the text before it is released and `stopped` is True. `flush()`
    returns what is left at the end. Runs on the engine thread (the scheduler calls it)."""

    def __init__(self, tokenizer, stop=()):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self.held = ""          # decoded, not released: it may be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> tuple:
        if self.decoder is None or self.stopped:
            return "", self.stopped
        self.held += self.decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        if self.decoder is None or self.stopped:
            return ""
        self.held += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple:
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out, True
        keep = 0 if final else _longest_partial(self.held, self.stop)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False


def _longest_partial(text: str, stops: list) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
