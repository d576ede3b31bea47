"""A static key/value cache for decoding: preallocated once per episode, filled in place.

The runtime (infer.py) prefills the prompt, decodes token by token, and appends each tool
observation in one forward pass at the current offset: the model's forward with `cache=` writes
the new keys and values at [pos, pos + T) of every layer and attends over [0, pos + T). Nothing is
ever re-encoded and nothing is reallocated, so a step's cost depends on what it adds, not on the
length of the episode so far.
"""
from __future__ import annotations

import torch

from agentc.model.transformer import ModelConfig


class CacheFull(RuntimeError):
    """The episode outgrew the cache (the runtime reports it as a token-limit failure)."""


class KVCache:
    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device="cpu", dtype=torch.float32):
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)  # (L, B, S, KV, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens held; the next token goes at this position

    def reset(self) -> None:
        self.pos = 0  # stale entries past pos are never read

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise CacheFull(f"{self.pos} cached + {n} new tokens exceed the cache of {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, KV, D) at [pos, pos + T) of `layer`; return that layer's keys and
        values for [0, pos + T) as views (B, pos + T, KV, D)."""
        end = self.pos + k.shape[1]
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n
