"""tokenizer_config.json: the companion file that lets `transformers.AutoTokenizer` load our tokenizer.

tokenizer.json holds the whole tokenizer; this file only tells transformers which class to use,
which tokens play the bos/eos/pad/unk roles, and how to render a chat (ChatML with tools and
thinking, as Qwen3 does: acornlm.tokenizer.chat_template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from acornlm.errors import CheckpointError
from acornlm.tokenizer.chat_template import CHAT_TEMPLATE
from acornlm.tokenizer.special_tokens import CHAT_TOKENS, EOT_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

# transformers' own "no limit known" value (VERY_LARGE_INTEGER). The tokenizer does not know the
# context length of the model it will serve; pass model_max_length to `Tokenizer.save` when you do.
UNLIMITED_MODEL_MAX_LENGTH = int(1e30)

def tokenizer_config(kind: str, added_tokens: dict[int, str], model_max_length: int | None = None) -> dict[str, Any]:
    """The tokenizer_config.json contents; `added_tokens` maps id -> content of every added token
    (the reserved special tokens at the lowest ids, the chat tokens at the end)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "acornlm_kind": kind,
        # GPT-2 convention: one token marks document boundaries, so it is bos, eos and padding at once.
        # Nothing is added automatically (no post-processor); training data places it explicitly.
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "unk_token": UNK_TOKEN if UNK_TOKEN in added_tokens.values() else None,  # byte-level BPE has no unknowns
        "add_bos_token": False,
        "add_eos_token": False,
        "additional_special_tokens": [token for token in SPECIAL_TOKENS if token != EOT_TOKEN],
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token not in CHAT_TOKENS,  # decoding keeps <think>, <tool_call>, ...
            }
            for token_id, token in sorted(added_tokens.items())
        },
        "model_max_length": model_max_length or UNLIMITED_MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """The tokenizer_config.json of a checkpoint or tokenizer directory ({} when there is none);
    CheckpointError naming the file when it is corrupt."""
    file = Path(directory) / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt: {exc}") from exc
    return data if isinstance(data, dict) else {}
