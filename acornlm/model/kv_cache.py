"""A preallocated key/value cache: decoding writes into fixed buffers instead of growing
tensors with `torch.cat` on every token."""

from __future__ import annotations

import torch

from acornlm.errors import ConfigError


class KVCache:
    """Keys and values of every layer for a batch of sequences that share one length."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values [B, kv_heads, T, D] of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ConfigError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward pass, after every layer has stored its keys/values."""
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0
