"""A static key/value cache for decoding: B rows, preallocated once, filled in place.

Each row holds one sequence (an episode) and has its own length. Before a forward the runtime binds
the rows it extends (`bind`); the model's forward with `cache=` then writes the new keys and values
of each bound row at [length, length + T) and attends over that row's [0, length + T). Nothing is
ever re-encoded and nothing is reallocated, so a step's cost depends on what it adds, not on the
length of the episode so far.

The cache's dtype may be narrower than the model's (a bfloat16 cache for a float32-activation
int8 model): keys and values are rounded when written and widened when read.

Layout (L, B, KV, S, D): one row's keys of one head are contiguous, which is what attention reads.
One bound row (a prefill, or batch-1 decoding) attends through the model's attention backend on a
view of its row. Several rows (batched decoding, each at its own offset) attend in one
scaled_dot_product_attention call over every row up to the longest bound one, with a mask that
keeps each query to its own row's keys; rows not bound get a zero query and their output is
dropped, which is cheaper than gathering the bound rows' caches into a new tensor at every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from agentc.model.transformer import ModelConfig, attend


class CacheFull(RuntimeError):
    """The episode outgrew the cache (the runtime reports it as a token-limit failure)."""


class KVCache:
    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device="cpu", dtype=torch.float32):
        # (L, B, KV, S, D); position max_len is scratch: compiled steps (model/decode.py) write the
        # keys of padding rows there, and no query ever reads it
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len + 1, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.batch = max_len, batch
        self.lengths = [0] * batch  # tokens held per row; a row's next token goes at its length
        self.bind([0])

    @property
    def pos(self) -> int:
        """Tokens held by the first bound row (the whole story for a one-row cache)."""
        return self.lengths[self.rows[0]]

    def bind(self, rows: list[int]) -> None:
        """The rows the next forward extends: row i of its tokens continues cache row rows[i]."""
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < self.batch for r in rows):
            raise ValueError(f"rows must be distinct rows of the cache's {self.batch}, got {rows}")
        self.rows = list(rows)

    def reset(self, row: int | None = None) -> None:
        """Empty one row, or every row; stale entries past a row's length are never read."""
        for r in range(self.batch) if row is None else [row]:
            self.lengths[r] = 0

    def check_room(self, n: int) -> None:
        for r in self.rows:
            if self.lengths[r] + n > self.max_len:
                raise CacheFull(f"{self.lengths[r]} cached + {n} new tokens exceed the cache of {self.max_len}")

    def positions(self, T: int, window: int | None, device) -> torch.Tensor:
        """(n_rows, T) positions of the next T tokens of every bound row; prepares this forward's
        writes and, for several rows, the mask every layer shares."""
        starts = torch.tensor([self.lengths[r] for r in self.rows], device=device)
        pos = starts[:, None] + torch.arange(T, device=device)
        self._pos, self._mask = pos, None
        if len(self.rows) > 1:
            self._idx = torch.tensor(self.rows, device=device)
            self._end = max(self.lengths[r] for r in self.rows) + T
            key = torch.arange(self._end, device=device)
            q = torch.zeros(self.batch, T, dtype=torch.long, device=device)
            q[self._idx] = pos
            mask = key <= q[:, :, None]                                 # (B, T, end): causal per row
            if window is not None:
                mask &= q[:, :, None] - key < window
            idle = torch.ones(self.batch, dtype=torch.bool, device=device)
            idle[self._idx] = False
            mask[idle, :, 0] = True  # rows not bound: one key, so their (dropped) softmax is finite
            self._mask = mask[:, None]                                  # (B, 1, T, end)
            self._all = self.rows == list(range(self.batch))
        return pos

    def attend(self, layer: int, q, k, v, docs, backend: str) -> torch.Tensor:
        """Write this layer's new keys and values k, v (n, T, KV, D) for the bound rows; return the
        attention output (n, T, H, D) of the queries q (n, T, H, D) over each row's keys."""
        n, T = q.shape[:2]
        if n == 1:
            r, start = self.rows[0], self.lengths[self.rows[0]]
            end = start + T
            self.k[layer, r, :, start:end] = k[0].transpose(0, 1)   # (casts to a bfloat16 cache)
            self.v[layer, r, :, start:end] = v[0].transpose(0, 1)
            keys = self.k[layer, r:r + 1, :, :end].transpose(1, 2)      # (1, end, KV, D) views
            values = self.v[layer, r:r + 1, :, :end].transpose(1, 2)
            return attend(q, keys.to(q.dtype), values.to(q.dtype), docs, backend)
        idx = self._idx[:, None]
        self.k[layer][idx, :, self._pos] = k.to(self.k.dtype)         # (n, T) of (KV, D) entries
        self.v[layer][idx, :, self._pos] = v.to(self.v.dtype)
        keys = self.k[layer, :, :, :self._end].to(q.dtype)
        values = self.v[layer, :, :, :self._end].to(q.dtype)
        if self._all:
            q_all = q.transpose(1, 2)
        else:
            q_all = q.new_zeros(self.batch, q.shape[2], T, q.shape[3])
            q_all[self._idx] = q.transpose(1, 2)
        out = F.scaled_dot_product_attention(q_all, keys, values, attn_mask=self._mask, enable_gqa=True)
        return (out if self._all else out[self._idx]).transpose(1, 2)  # (n, T, H, D)

    def advance(self, n: int) -> None:
        for r in self.rows:
            self.lengths[r] += n

    def copy_in(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill `row` with the keys and values k, v (L, KV, n, D) of an n-token prefix (a cached
        system prompt) and set its length to n."""
        n = k.shape[2]
        self.k[:, row, :, :n] = k
        self.v[:, row, :, :n] = v
        self.lengths[row] = n

    def copy_out(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n keys and values of `row`, as copies (L, KV, n, D)."""
        return self.k[:, row, :, :n].clone(), self.v[:, row, :, :n].clone()
