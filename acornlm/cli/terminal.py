"""Printing untrusted text (prompts, model output) to a terminal.

A prompt file or a model's reply can hold terminal escape sequences: ESC [ 2 J clears the screen,
OSC sequences set the window title or write to the clipboard on some terminals. `visible(text)`
shows every control character except newline and tab as its Python escape (ESC becomes the four
characters \\x1b), so the terminal prints them instead of obeying them. Printable text,
Chinese and emoji included, is unchanged.
"""

from __future__ import annotations

import re

# C0 controls but \t and \n, DEL, and the C1 controls (ESC's 8-bit forms, e.g. U+009B CSI).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` with control characters (other than \\n and \\t) written as escapes: "\\x1b[2J"."""
    return CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
