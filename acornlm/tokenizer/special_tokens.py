"""The special tokens every acornlm tokenizer reserves at its lowest ids.

Fixed ids mean code elsewhere (data preparation, chat templates, generation) can rely on
`<|endoftext|>` being 0 whatever tokenizer a run used.
"""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in every tokenizer
EOT_TOKEN, IM_START_TOKEN, IM_END_TOKEN = SPECIAL_TOKENS

# Char tokenizers only: id 3 stands for any character not seen in training (byte-level BPE never needs it).
UNK_TOKEN = "<|unk|>"

# The chat tokens: thinking and tool calling, as Qwen3 and MiniMind spell them. New tokenizers
# hold them at their last ids; an older tokenizer gains them at the end (`add_chat_tokens`), so no
# id it already has moves. They are ordinary added tokens (not "special"): decoding keeps them,
# because a reply's "<tool_call>" must reach the parser that turns it into a tool call.
CHAT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END = CHAT_TOKENS
