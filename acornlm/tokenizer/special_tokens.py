"""The special tokens every acornlm tokenizer reserves at its lowest ids.

Fixed ids mean code elsewhere (data preparation, chat templates, generation) can rely on
`<|endoftext|>` being 0 whatever tokenizer a run used.
"""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in every tokenizer
EOT_TOKEN, IM_START_TOKEN, IM_END_TOKEN = SPECIAL_TOKENS

# Char tokenizers only: id 3 stands for any character not seen in training (byte-level BPE never needs it).
UNK_TOKEN = "<|unk|>"
