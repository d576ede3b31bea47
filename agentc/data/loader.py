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

from agentc.data import documents
from agentc.data.pack import Shard, find_shards


class Batch(NamedTuple):
    tokens: torch.Tensor        # (B, T) int64 inputs
    targets: torch.Tensor       # (B, T) int64 the next token of each input
    loss_weights: torch.Tensor  # (B, T) float32 weight of each target (0 = not trained)
    doc_offsets: torch.Tensor   # (n_docs + 1,) int32 document boundaries in the flattened B*T tokens

    def positions(self) -> torch.Tensor:
        """(B, T) int64 positions that restart at 0 at every document."""
        return documents.positions(self.doc_offsets, *self.tokens.shape)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


class Loader:
    """Iterate batches over packed shards; `path` is anything agentc.data.pack.find_shards accepts."""

    def __init__(self, path: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shards = [Shard(p) for p in find_shards(path)]
        kinds = {(s.row_len, s.vocab_size) for s in self.shards}
        if len(kinds) != 1:
            raise ValueError(f"shards of {path!r} disagree on (row length, vocabulary): {sorted(kinds)}")
        self.row_len, self.vocab_size = kinds.pop()
        self.seq_len = self.row_len - 1
        # global row r lives in shard shard_of[r] at local index r - first_row[shard_of[r]]
        counts = np.array([s.n_rows for s in self.shards])
        self.first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.n_rows = int(counts.sum())
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # 0 is allowed for a loader used only for one_pass() (a small validation set); training
        # from it fails at the first step
        self.steps_per_epoch = self.n_rows // (batch_size * world_size)
        self.path = path
        self.step = 0  # global steps taken; the data position
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its row order)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "n_rows": self.n_rows, "shuffle": self.shuffle,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved step. The rows a step covers depend on the global batch (batch_size x
        world_size), so it must be the same; how it splits over ranks may change."""
        mine = self.state_dict()
        diff = {k: (state.get(k), mine[k]) for k in mine if k != "step" and state.get(k) != mine[k]}
        if diff:
            raise ValueError("loader state does not match this loader (saved, now): " +
                             ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
        self.step = state["step"]

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_rows) if self.shuffle
                     else np.arange(self.n_rows))
            self._perm = (epoch, order)
        return self._perm[1]

    def rows_for_step(self, step: int) -> np.ndarray:
        """The global row indices this rank reads at `step`."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.path!r} has {self.n_rows} rows, fewer than one global batch "
                             f"({self.batch_size} x {self.world_size} ranks)")
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

    def next_micro_batches(self, n: int) -> list[Batch]:
        """This rank's rows of the next step split into n micro-batches (gradient accumulation):
        the rows a step covers depend only on the global batch, not on how it is split."""
        rows = self.rows_for_step(self.step)
        if len(rows) % n:
            raise ValueError(f"{len(rows)} rows per rank do not split into {n} micro-batches")
        self.step += 1
        return [self.read_rows(part) for part in np.split(rows, n)]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def pass_rows(self) -> np.ndarray:
        """The rows this rank reads in one_pass(): rows rank, rank + world_size, ..., so the ranks
        cover every row once between them (some may read one row more than others). Validation
        sums its loss locally and all-reduces once, so its result is the same for any number of
        ranks."""
        return np.arange(self.n_rows)[self.rank::self.world_size]

    def one_pass(self) -> Iterator[Batch]:
        """pass_rows() once, in file order, for validation; the last batch may be smaller. Does
        not move the training position."""
        mine = self.pass_rows()
        for i in range(0, len(mine), self.batch_size):
            yield self.read_rows(mine[i:i + self.batch_size])
