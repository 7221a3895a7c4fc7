"""The model: one configurable Transformer, its config and its KV cache."""

from acornlm.model.config import ModelConfig
from acornlm.model.kv_cache import KVCache
from acornlm.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
