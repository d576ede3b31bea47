"""Documents in packed rows: per-token facts derived from the loader's `doc_offsets`.

A batch of B rows of T tokens holds several documents (trajectories) per row. `doc_offsets` are
their cumulative boundaries over the flattened B*T tokens: 0, the end of document 0, ..., B*T
(FlashAttention's "cu_seqlens"). A document never crosses a row. The loader, the model, the
attention kernel and its reference all derive what they need from these offsets here, on the
offsets' device and without a host sync.
"""
from __future__ import annotations

import torch


def document_ids(doc_offsets: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) int64: the index of each token's document."""
    tok = torch.arange(B * T, device=doc_offsets.device)
    return (torch.searchsorted(doc_offsets.long(), tok, right=True) - 1).view(B, T)


def positions(doc_offsets: torch.Tensor, B: int, T: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) int64 positions that restart at 0 at every document; ids: document_ids(), when the
    caller has them already."""
    ids = document_ids(doc_offsets, B, T) if ids is None else ids
    return torch.arange(B * T, device=ids.device).view(B, T) - doc_offsets.long()[ids]


def bounds(doc_offsets: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-local (start, end) of each token's document, (B, T) int32 each."""
    off = doc_offsets.long()
    ids = document_ids(off, B, T)
    row0 = torch.arange(B, device=off.device)[:, None] * T
    return (off[ids] - row0).to(torch.int32), (off[ids + 1] - row0).clamp(max=T).to(torch.int32)


def attention_mask(T: int, S: int, ids: torch.Tensor | None = None, window: int | None = None,
                   device=None) -> torch.Tensor:
    """(B, T, S) bool (B = 1 without ids): True where query i may attend key j. The T queries are
    the last T of the S keys' positions (bottom-right causal: query i sits at S - T + i and sees
    keys j <= S - T + i). ids (B, T), only when S == T: also only keys of its own document.
    window: also only the `window` most recent keys, itself included."""
    i = torch.arange(T, device=device)[:, None] + (S - T)  # query positions
    j = torch.arange(S, device=device)[None, :]            # key positions
    allowed = (j <= i)[None]
    if ids is not None:
        if S != T:
            raise ValueError("document ids describe packed rows, where the keys are the queries (S == T)")
        allowed = allowed & (ids[:, :, None] == ids[:, None, :])
    if window is not None:
        allowed = allowed & (i - j < window)[None]
    return allowed
