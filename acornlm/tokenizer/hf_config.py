"""tokenizer_config.json: the companion file that lets `transformers.AutoTokenizer` load our tokenizer.

tokenizer.json holds the whole tokenizer; this file only tells transformers which class to use,
which tokens play the bos/eos/pad/unk roles, and how to render a chat (ChatML, as Qwen does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from acornlm.errors import CheckpointError
from acornlm.tokenizer.special_tokens import EOT_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

# transformers' own "no limit known" value (VERY_LARGE_INTEGER). The tokenizer does not know the
# context length of the model it will serve; pass model_max_length to `Tokenizer.save` when you do.
UNLIMITED_MODEL_MAX_LENGTH = int(1e30)

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n"
# when the caller asks for a generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The text CHATML_TEMPLATE renders, in plain Python (for code that does not load transformers)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def tokenizer_config(kind: str, reserved_tokens: list[str], model_max_length: int | None = None) -> dict[str, Any]:
    """The tokenizer_config.json contents; `reserved_tokens[i]` is the special token with id i."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "acornlm_kind": kind,
        # GPT-2 convention: one token marks document boundaries, so it is bos, eos and padding at once.
        # Nothing is added automatically (no post-processor); training data places it explicitly.
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "unk_token": UNK_TOKEN if UNK_TOKEN in reserved_tokens else None,  # byte-level BPE has no unknowns
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
                "special": True,
            }
            for token_id, token in enumerate(reserved_tokens)
        },
        "model_max_length": model_max_length or UNLIMITED_MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
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
