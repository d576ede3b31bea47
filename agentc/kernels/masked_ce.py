"""Fused, masked LM-head cross-entropy: the loss over the model's own tokens without the [N, V]
logits.

    loss = masked_cross_entropy(h, W, targets, weights)   # sum_i w_i * CE(h_i @ W.T, y_i) / sum_i w_i

h (N, d) hidden states, W (V, d) the LM head, targets (N,) int, weights (N,) float (0 for tokens
the model does not produce). kernels/reference.py holds the pure-PyTorch twin
(`masked_cross_entropy`).

How it works. Rows with weight 0 are dropped before any product (a trajectory trains only its
model's tokens, often a third of them), so the cost scales with trained tokens. The trained rows
go through in chunks of `chunk_rows`; for each chunk:
  1. logits = h_c @ W.T                     one GEMM, (chunk, V): never the whole (N, V)
  2. the Triton kernel, one program per row, walks the row in vocabulary tiles with an online
     log-sum-exp (running max and sum), takes the target's logit, writes the row's loss, and then
     overwrites the logits with their gradient, w * (softmax * (1 + 2 z lse) - onehot(y)), in place
  3. dh_c = g @ W  and  dW += g.T @ h_c       dW accumulates in float32 across chunks
The gradients are computed during the forward (the logits are at hand then; recomputing them
would cost a fourth GEMM), kept, and scaled by the incoming gradient in the backward. Without a
gradient to compute (evaluation, no_grad) step 2 only reads and step 3 is skipped.

Peak extra memory: one chunk of logits (by default 1/32 of the rows, at least 128, at most 4096)
plus the float32 dW accumulator (which is the gradient itself when W is float32, as under
autocast). Under autocast the products run in the autocast dtype, from float32 weights that get
their float32 gradient back. An all-zero weight vector gives loss 0 and zero gradients. Optional z-loss: z * lse^2
per row (PaLM), weighted like the CE.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _ce_rows_kernel(LOGITS, stride_row, TARGETS, WEIGHTS, LOSS, n_vocab, z_loss,
                    BV: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One row of a chunk: its loss, and (WRITE_GRAD) its logits replaced by their gradient."""
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BV)
    m = tl.max(tl.full([BV], float("-inf"), tl.float32), 0)  # running max and sum, as scalars
    s = tl.sum(tl.zeros([BV], tl.float32), 0)
    for v0 in range(0, n_vocab, BV):
        x = tl.load(base + v0 + cols, mask=v0 + cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    y = tl.load(TARGETS + row)
    w = tl.load(WEIGHTS + row).to(tl.float32)
    x_y = tl.load(base + y).to(tl.float32)
    tl.store(LOSS + row, w * (lse - x_y + z_loss * lse * lse))
    if WRITE_GRAD:
        scale = 1.0 + 2.0 * z_loss * lse  # d(z lse^2)/dx = 2 z lse softmax
        for v0 in range(0, n_vocab, BV):
            c = v0 + cols
            x = tl.load(base + c, mask=c < n_vocab, other=0.0).to(tl.float32)
            g = w * (tl.exp(x - lse) * scale - tl.where(c == y, 1.0, 0.0))
            tl.store(base + c, g.to(LOGITS.dtype.element_ty), mask=c < n_vocab)


def _rows_kernel(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, z_loss: float,
                 write_grad: bool) -> torch.Tensor:
    n, V = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    BV = 256 if INTERPRET else min(8192, triton.next_power_of_2(V))
    _ce_rows_kernel[(n,)](logits, logits.stride(0), targets, weights, loss, V, z_loss,
                          BV=BV, WRITE_GRAD=write_grad, num_warps=8 if BV >= 4096 else 4)
    return loss


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc float32 and a, b possibly bf16/fp16: on CUDA in one GEMM that
    accumulates into acc (no temporary of acc's size), elsewhere through a float32 product."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # a PyTorch without out_dtype for addmm
            pass
    acc += (a @ b).float()


def default_chunk_rows(n_rows: int) -> int:
    return max(128, min(4096, n_rows // 32))


class MaskedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, weights, z_loss, chunk_rows, dtype):
        with torch.autocast(h.device.type, enabled=False):  # the products run in `dtype`, explicitly
            return MaskedCrossEntropy._forward(ctx, h, W, targets, weights, z_loss, chunk_rows, dtype)

    @staticmethod
    def _forward(ctx, h, W, targets, weights, z_loss, chunk_rows, dtype):
        keep = weights.nonzero().squeeze(1)  # one host sync: how many rows are trained
        n = keep.numel()
        want_dh, want_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h) if want_dh else None
        dW = torch.zeros(W.shape, device=W.device, dtype=torch.float32) if want_dW else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        if n:
            Wc = W.to(dtype)  # a copy only under autocast (float32 master weights, bf16 products)
            hk = h.index_select(0, keep).to(dtype)
            tk, wk = targets.index_select(0, keep), weights.index_select(0, keep).float()
            for s in range(0, n, chunk_rows):
                e = min(n, s + chunk_rows)
                logits = hk[s:e] @ Wc.T                                  # (chunk, V): the only logits there are
                total += _rows_kernel(logits, tk[s:e], wk[s:e], z_loss, want_dh or want_dW).sum()
                if want_dh:
                    dh.index_copy_(0, keep[s:e], (logits @ Wc).to(dh.dtype))  # logits now hold their gradient
                if want_dW:
                    _addmm_fp32(dW, logits.T, hk[s:e])
        ctx.grads = (dh, dW, W.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dh, dW, w_dtype = ctx.grads
        ctx.grads = None
        if dh is not None:
            dh = dh.mul_(grad_out.to(dh.dtype))
        if dW is not None:
            dW = dW.mul_(grad_out).to(w_dtype)
        return dh, dW, None, None, None, None, None


def masked_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         z_loss: float = 0.0, reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i weights_i * (CE(h_i @ W.T, targets_i) + z_loss * lse_i^2), divided by sum(weights)
    for reduction "mean" (0 when every weight is 0), as a float32 scalar. h (..., d) and targets,
    weights (...) are flattened."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = h.reshape(-1, h.shape[-1])
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    if W.ndim != 2 or W.shape[1] != h.shape[1]:
        raise ValueError(f"head weight {tuple(W.shape)} does not match hidden size {h.shape[1]}")
    if targets.shape[0] != h.shape[0] or weights.shape[0] != h.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows, {targets.shape[0]} targets, {weights.shape[0]} weights")
    if not (h.is_floating_point() and W.is_floating_point()):
        raise TypeError(f"hidden states and head weight must be floating point, got {h.dtype} and {W.dtype}")
    if not (h.is_cuda or INTERPRET):
        raise RuntimeError("the fused cross-entropy kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    h = h if h.stride(-1) == 1 else h.contiguous()
    chunk = chunk_rows or default_chunk_rows(h.shape[0])
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype  # the GEMMs' dtype
    total = MaskedCrossEntropy.apply(h, W, targets.long(), weights, float(z_loss), chunk, dtype)
    if reduction == "sum":
        return total
    return total / weights.float().sum().clamp_min(1e-12)  # all-zero weights: 0 / eps = 0
