"""Tokenizers: byte-level BPE or char-level, trained here and saved as Hugging Face tokenizer files.

    from acornlm.tokenizer import train_tokenizer, load_tokenizer
    tok = train_tokenizer(texts, kind="bpe", vocab_size=4096)
    tok.save("tok/")                      # tokenizer.json + tokenizer_config.json
    ids = load_tokenizer("tok/").encode("Hello")

Every tokenizer reserves SPECIAL_TOKENS at ids 0, 1, 2 (`<|endoftext|>` is the document
separator and padding; `<|im_start|>`/`<|im_end|>` frame ChatML messages).
"""

from acornlm.tokenizer.special_tokens import SPECIAL_TOKENS
from acornlm.tokenizer.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "load_tokenizer", "train_tokenizer"]
