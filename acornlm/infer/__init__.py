"""Generation from a trained checkpoint.

    sampling.py    SamplingParams and the logits transforms (penalties, temperature, top-k/p, min-p)
    generate.py    the decoding loop: one prefill, then one token per step through the KV cache
    streaming.py   token ids -> text pieces that never split a character or leak a stop string
    api.py         LanguageModel (what `acornlm.load(dir)` returns): generate() and stream()
    tools.py       Python functions as tools: their JSON schema, and calling one with a timeout
    agent.py       multi-turn rollouts: the model calls tools, acornlm runs them, the model goes on
"""

from acornlm.infer.api import LanguageModel
from acornlm.infer.generate import generate_batch, generate_tokens
from acornlm.infer.sampling import SamplingParams
from acornlm.infer.streaming import StreamingDetokenizer

__all__ = ["LanguageModel", "SamplingParams", "StreamingDetokenizer", "generate_batch", "generate_tokens"]
