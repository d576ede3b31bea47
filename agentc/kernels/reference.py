"""Pure-PyTorch twins of the Triton kernels in this folder: slow, obvious, and exact in float64.

Every kernel's tests compare against the function here on fresh random inputs, forward and
backward (autograd through these is the reference gradient). Never deleted, never optimised.
"""
from __future__ import annotations

import math

import torch

from agentc.data import documents


def attention_mask(B: int, T: int, S: int, doc_offsets: torch.Tensor | None = None,
                   device=None) -> torch.Tensor:
    """(B, T, S) bool, True where query i may see key j. The T queries are the last T of the S
    keys' positions (bottom-right causal: query i sits at position S - T + i and sees keys
    j <= S - T + i); with doc_offsets (only when S == T) also only keys of its own document."""
    ids = None if doc_offsets is None else documents.document_ids(doc_offsets.to(device), B, T)
    return documents.attention_mask(T, S, ids, device=device).expand(B, T, S)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              doc_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with grouped-query heads and optional document masking.

    q (B, T, H, D); k, v (B, S, KV, D) with H a multiple of KV and S >= T (S > T: the queries are
    appended to S - T cached keys). Scale 1/sqrt(D). Computed in q's dtype (float64 for tests)."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} key/value heads")
    k = k.repeat_interleave(H // KV, dim=2)
    v = v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    allowed = attention_mask(B, T, S, doc_offsets, q.device)[:, None]  # (B, 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def masked_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """sum_i w_i * (CE(h_i @ W.T, y_i) + z_loss * logsumexp_i^2), over sum_i w_i for "mean" (0 when
    every weight is 0). The full logits, in float32 at least (float64 stays float64)."""
    h = h.reshape(-1, h.shape[-1])
    logits = (h @ W.T).to(torch.promote_types(h.dtype, torch.float32))
    lse = logits.logsumexp(dim=-1)
    per_row = lse - logits.gather(1, targets.reshape(-1, 1).long())[:, 0] + z_loss * lse * lse
    w = weights.reshape(-1).to(logits.dtype)
    total = (per_row * w).sum()
    return total if reduction == "sum" else total / w.sum().clamp_min(1e-12)
