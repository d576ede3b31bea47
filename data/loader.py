"""Batches of packed rows for training: (tokens, targets, loss_weights, doc_offsets).

Every epoch visits all rows of all shards in a permutation drawn from (seed, epoch); a global
step takes batch_size * world_size rows and rank r keeps its own batch_size of them, so ranks never
see the same row and the data position is one number (the step), saved in checkpoints through
state_dict(). Rows left over at the end of an epoch (fewer than one global step) are skipped for
that epoch only: the next permutation puts them elsewhere.

doc_offsets are cumulative document boundaries over the flattened (B*T) tokens, int32, starting at 0
and ending at B*T: the varlen ("cu_seqlens") convention of FlashAttention. A document cut by the
end of the input window (its last token is only a target) ends at the row's end.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from data.pack import Shard, find_shards


class Batch(NamedTuple):
    tokens: torch.Tensor        # (B, T) int64 inputs
    targets: torch.Tensor       # (B, T) int64 the next token of each input
    loss_weights: torch.Tensor  # (B, T) float32 weight of each target (0 = not trained)
    doc_offsets: torch.Tensor   # (n_docs + 1,) int32 document boundaries in the flattened B*T tokens

    def positions(self) -> torch.Tensor:
        """(B, T) int64 positions that restart at 0 at every document."""
        B, T = self.tokens.shape
        off = self.doc_offsets.long()
        starts = torch.repeat_interleave(off[:-1], off[1:] - off[:-1])
        return (torch.arange(B * T, device=off.device) - starts).view(B, T)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


class Loader:
    """Iterate batches over packed shards; `path` is anything data.pack.find_shards accepts."""

    def __init__(self, path: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shards = [Shard(p) for p in find_shards(path)]
        row_lens = {s.row_len for s in self.shards}
        if len(row_lens) != 1:
            raise ValueError(f"shards of {path!r} have different row lengths {sorted(row_lens)}")
        self.row_len = row_lens.pop()
        self.seq_len = self.row_len - 1
        self.vocab_size = self.shards[0].vocab_size
        # global row r lives in shard shard_of[r] at local index r - first_row[shard_of[r]]
        counts = np.array([s.n_rows for s in self.shards])
        self.first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.n_rows = int(counts.sum())
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = self.n_rows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{path!r} has {self.n_rows} rows, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.step = 0  # global steps taken; the data position

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_rows"] != self.n_rows or state["seed"] != self.seed:
            raise ValueError(f"loader state is for {state['n_rows']} rows / seed {state['seed']}, "
                             f"these shards have {self.n_rows} rows / seed {self.seed}")
        self.step = state["step"]

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def rows_for_step(self, step: int) -> np.ndarray:
        """The global row indices this rank reads at `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        first = (k * self.world_size + self.rank) * self.batch_size
        return self._order(epoch)[first:first + self.batch_size]

    def read_rows(self, rows: np.ndarray) -> Batch:
        T = self.seq_len
        B = len(rows)
        toks = np.empty((B, self.row_len), np.int64)
        wts = np.empty((B, T), np.float32)
        offsets = [0]
        for b, g in enumerate(rows):
            s = int(np.searchsorted(self.first_row, g, side="right")) - 1
            shard, r = self.shards[s], int(g - self.first_row[s])
            toks[b] = shard.tokens[r]
            wts[b] = shard.weights[r, 1:]
            starts, _ = shard.docs(r)
            offsets.extend(b * T + int(x) for x in starts[1:] if x < T)  # a doc starting at T has no input
            offsets.append((b + 1) * T)
        tokens = torch.from_numpy(toks)
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(wts),
                     torch.tensor(offsets, dtype=torch.int32))

    def next_batch(self) -> Batch:
        batch = self.read_rows(self.rows_for_step(self.step))
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def one_pass(self) -> Iterator[Batch]:
        """Every row this rank owns exactly once, in file order (for validation); the last batch
        may be smaller. Does not move the training position."""
        mine = np.arange(self.n_rows)[self.rank::self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield self.read_rows(mine[i:i + self.batch_size])
