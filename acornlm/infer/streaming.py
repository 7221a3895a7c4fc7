"""Incremental detokenization: token ids in, text pieces out, safe to print as they arrive.

Two things make this harder than `decode(ids)` per token:

1. A byte-level BPE token is a run of *bytes*, and one character (a Chinese character is 3 bytes
   in UTF-8, an emoji 4) may be split across tokens. Printing each token's bytes on its own would
   show broken characters. So the raw bytes go through Python's incremental UTF-8 decoder, which
   emits only whole characters and keeps an incomplete tail until the next token completes it.
   Bytes that can never form a character are shown as U+FFFD, like `bytes.decode(errors="replace")`.
2. A stop string must never be shown, not even its first half. So text that could still grow
   into a stop string is held back until the next token decides; when a stop string appears,
   only the text before it is released and the stream ends.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(positions, default=-1)


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is the start of some stop string (and so must be held)."""
    longest = min(len(text), max((len(s) for s in stop), default=1) - 1)
    for length in range(longest, 0, -1):
        suffix = text[-length:]
        if any(s.startswith(suffix) for s in stop):
            return length
    return 0


class StreamingDetokenizer:
    """Turns one sequence's token ids into text pieces that never split a character or leak a stop string.

    Usage: `piece = detok.push(token_id)` per token (print it; it may be ""), then `detok.flush()` at
    the end. Once `stopped` is True a stop string was found and further tokens are ignored.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()) -> None:
        self.token_bytes = token_bytes
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released because it may be the start of a stop string

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(self.token_bytes(token_id)), final=False)

    def flush(self) -> str:
        """End of generation: release the held text; bytes of an unfinished character become U+FFFD."""
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, text: str, final: bool) -> str:
        self._held += text
        stop_at = find_stop(self._held, self.stop)
        if stop_at >= 0:
            self.stopped = True
            piece, self._held = self._held[:stop_at], ""
            return piece
        keep = 0 if final else partial_stop_length(self._held, self.stop)
        cut = len(self._held) - keep
        piece, self._held = self._held[:cut], self._held[cut:]
        return piece
