"""FlashAttention in Triton for packed trajectories: causal, grouped-query, document-masked.

    out = flash_attention(q, k, v, doc_offsets=None)   # q (B, T, H, D), k and v (B, S, KV, D)

Training: S == T, and doc_offsets (cu_seqlens form over the flattened B*T tokens, as the loader
yields them) split each row into documents that never see each other. The runtime: S > T, the T
queries appended to S - T cached keys (bottom-right causal alignment, T = 1 is single-token
decoding); forward only. kernels/reference.py holds the pure-PyTorch twin (`attention`).

How it works (FlashAttention-2, Dao 2023). One program owns a tile of BM queries of one head and
walks the key tiles that can matter to them, keeping a running max and sum of the softmax so the
T x S scores never exist in memory; it stores the output and the log-sum-exp per query. The
backward recomputes the probabilities from that log-sum-exp: one kernel per key tile accumulates
dK and dV (over every query head of its group, so grouped-query attention needs no atomics), one
per query tile accumulates dQ.

Document masking without a host sync. Each token carries the row-local start of its document
(`starts`) and its end (`ends`), computed on the device from doc_offsets. A query tile needs the
keys from the start of its first query's document up to its last query; key tiles before that are
skipped, not computed. Of the rest, only tiles that cross the causal diagonal or a document
boundary are masked element by element (three loop phases: boundary, full, diagonal); every other
tile runs the unmasked inner loop. A key tile's backward likewise visits only the queries of its
documents. The grid is (query tiles of a row, B * heads): no table of documents, no .tolist().

Layout: kernels -> launcher -> autograd.Function, as in every file of agentc/kernels. Scores are kept in
base 2 (exp2 with the softmax scale folded into log2(e)); accumulation in float32 for bf16/fp16/
float32 inputs (float32 dots in IEEE precision, not tf32). Head dims up to 256 (padded to a power
of two inside the kernel: 80 and 96 run in 128-wide tiles). Sliding windows are not supported here
(the model falls back to PyTorch for them).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from agentc.data import documents

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # initial running max: finite, so a fully masked row gives exp2(-inf - NEG_BIG) = 0, not NaN


def _configs(kind: str) -> list[triton.Config]:
    """Tile shapes to try. Under the CPU interpreter one small tile (fast, and exercises every
    phase of the loops at the tests' sizes); on a GPU a few Hopper/Ampere-sized candidates,
    picked per head dim and dtype by triton.autotune on first use."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=1, num_stages=1)]
    # The last shape of each list is small enough for float32 inputs at head dim 256 (under 140 KiB
    # of shared memory on sm_90; experiments/kernel_report.py), so every input the launcher
    # accepts has a config that fits; the autotuner skips those that do not.
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)]
    else:  # dq and dkdv
        shapes = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 1)]
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# ----------------------------------------------------------------------------- forward


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32. UPCAST: the CPU interpreter's dot gets bfloat16 wrong (Triton 3.9), so
    there bfloat16 operands are widened first, which gives the products the GPU's bf16 dot
    computes exactly (each bf16 x bf16 product is exact in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(base, rows, stride, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (len(rows), BLOCK_D) tile of rows `rows` of a (n_rows, D) slice whose rows are `stride`
    apart; zeros past n_rows and past D."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)



@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, qstart, lo, hi,
               S, OFFSET, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key tiles [lo, hi) for one query tile; MASKED tiles apply the causal
    and document mask element by element."""
    offs_n = tl.arange(0, BN)
    for n0 in range(lo, hi, BN):
        kj = n0 + offs_n
        k = _load_rows(k_base, kj, stride_ks, S, D, BLOCK_D)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        if MASKED:
            ok = (kj[None, :] >= qstart[:, None]) & (kj[None, :] <= offs_m[:, None] + OFFSET) & (kj[None, :] < S)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, kj, stride_vs, S, D, BLOCK_D)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_tile_ranges(STARTS, b, m0, T, S, OFFSET, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key ranges for the query tile [m0, m0 + BM): masked [lo, mid_a), full [mid_a, mid_b),
    masked [mid_b, hi). Keys before the first query's document start are never visited."""
    last = tl.minimum(m0 + BM, T) - 1
    if HAS_DOCS:
        lo = tl.load(STARTS + b * T + m0)            # document start of the first query
        start_last = tl.load(STARTS + b * T + last)  # ... and of the last
    else:
        lo = m0 * 0
        start_last = m0 * 0
    lo = (lo // BN) * BN
    hi = tl.minimum(last + 1 + OFFSET, S)
    full_lo = tl.cdiv(start_last, BN) * BN        # from here every key is in every query's document
    full_hi = ((m0 + OFFSET + 1) // BN) * BN      # up to here every key is <= every query
    mid_a = tl.maximum(lo, tl.minimum(full_lo, full_hi))
    mid_b = tl.maximum(mid_a, full_hi)
    return lo, mid_a, mid_b, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, STARTS,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh,
                T, S, H, GROUP, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) query tiles first
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    OFFSET = S - T
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, T, D, BLOCK_D)
    if HAS_DOCS:
        qstart = tl.load(STARTS + b * T + offs_m, mask=m_valid, other=0)
    else:
        qstart = tl.zeros([BM], dtype=tl.int32)
    lo, mid_a, mid_b, hi = _query_tile_ranges(STARTS, b, m0, T, S, OFFSET, BM, BN, HAS_DOCS)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BM], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, qstart,
                               lo, mid_a, S, OFFSET, qk_scale, D, BLOCK_D, BN, True, PRECISION, UPCAST)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, qstart,
                               mid_a, mid_b, S, OFFSET, qk_scale, D, BLOCK_D, BN, False, PRECISION, UPCAST)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, qstart,
                               mid_b, hi, S, OFFSET, qk_scale, D, BLOCK_D, BN, True, PRECISION, UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past T, which are not stored
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=m_valid)  # base 2, scaled scores


_fwd_tuned = triton.autotune(configs=_configs("fwd"), key=["BLOCK_D", "HAS_DOCS", "PRECISION", "UPCAST"])(_fwd_kernel)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
                  T, H, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr):
    """delta[b, h, t] = sum_d out * d_out, the softmax backward's row term."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ot, T, D, BLOCK_D)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_dt, T, D, BLOCK_D)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, qstart, lo, hi, T,
              qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BN)
    for n0 in range(lo, hi, BN):
        kj = n0 + offs_n
        k = _load_rows(k_base, kj, stride_ks, T, D, BLOCK_D)
        v = _load_rows(v_base, kj, stride_vs, T, D, BLOCK_D)
        p = tl.exp2(_mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale - lse[:, None])
        if MASKED:
            ok = (kj[None, :] >= qstart[:, None]) & (kj[None, :] <= offs_m[:, None]) & (offs_m[:, None] < T)
            p = tl.where(ok, p, 0.0)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, STARTS,
               stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
               stride_vb, stride_vs, stride_vh, stride_db, stride_dt, stride_dh,
               T, H, GROUP, qk_scale, sm_scale,
               D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):
    """dQ of one query tile (DQ has Q's strides; DO's strides are its own)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    tile_mask = m_valid[:, None] & (offs_d[None, :] < D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, T, D, BLOCK_D)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_dt, T, D, BLOCK_D)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_valid, other=0.0)
    if HAS_DOCS:
        qstart = tl.load(STARTS + b * T + offs_m, mask=m_valid, other=0)
    else:
        qstart = tl.zeros([BM], dtype=tl.int32)
    lo, mid_a, mid_b, hi = _query_tile_ranges(STARTS, b, m0, T, T, 0, BM, BN, HAS_DOCS)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BM, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, qstart, lo, mid_a, T,
                   qk_scale, D, BLOCK_D, BN, True, PRECISION, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, qstart, mid_a, mid_b, T,
                   qk_scale, D, BLOCK_D, BN, False, PRECISION, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, qstart, mid_b, hi, T,
                   qk_scale, D, BLOCK_D, BN, True, PRECISION, UPCAST)
    tl.store(DQ + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, b, stride_qt, stride_dt,
                offs_n, lo, hi, T, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                HAS_DOCS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate one key tile's dK, dV over query tiles [lo, hi) of one head, in the transposed
    form (scores as keys x queries), so no tile is ever transposed in memory."""
    for m0 in range(lo, hi, BM):
        qi = m0 + tl.arange(0, BM)
        q_valid = qi < T
        q = _load_rows(q_base, qi, stride_qt, T, D, BLOCK_D)
        do = _load_rows(do_base, qi, stride_dt, T, D, BLOCK_D)
        lse = tl.load(lse_base + qi, mask=q_valid, other=0.0)
        delta = tl.load(delta_base + qi, mask=q_valid, other=0.0)
        pT = tl.exp2(_mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale - lse[None, :])  # (BN, BM)
        if MASKED:
            ok = (offs_n[:, None] <= qi[None, :]) & q_valid[None, :]
            if HAS_DOCS:
                qstart = tl.load(STARTS + b * T + qi, mask=q_valid, other=0)
                ok = ok & (offs_n[:, None] >= qstart[None, :])
            pT = tl.where(ok, pT, 0.0)
        dv += _mm(pT.to(do.dtype), do, PRECISION, UPCAST)
        dpT = _mm(v, tl.trans(do), PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += _mm(dsT.to(q.dtype), q, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, STARTS, ENDS,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_db, stride_dt, stride_dh,
                 T, H, KV, GROUP, qk_scale, sm_scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """dK, dV of one key tile of one kv head, summed over the GROUP query heads that share it
    (DK has K's strides, DV has V's)."""
    bkv = tl.program_id(1)
    b, kvh = bkv // KV, bkv % KV
    n0 = tl.program_id(0) * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < T
    tile_mask = n_valid[:, None] & (offs_d[None, :] < D)
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, offs_n, stride_ks, T, D, BLOCK_D)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, offs_n, stride_vs, T, D, BLOCK_D)

    # Queries that see these keys: from n0 (causal) to the end of the last key's document. Those
    # inside the first key's document and past the diagonal tiles see every key of the tile.
    if HAS_DOCS:
        end_first = tl.load(ENDS + b * T + n0)
        end_last = tl.load(ENDS + b * T + tl.minimum(n0 + BN, T) - 1)
    else:
        end_first = T
        end_last = T
    diag_end = n0 + tl.cdiv(BN, BM) * BM
    full_end = tl.maximum(diag_end, diag_end + ((end_first - diag_end) // BM) * BM)

    dk = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, b, stride_qt, stride_dt,
                             offs_n, n0, diag_end, T, qk_scale, D, BLOCK_D, BM, HAS_DOCS, True, PRECISION, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, b, stride_qt, stride_dt,
                             offs_n, diag_end, full_end, T, qk_scale, D, BLOCK_D, BM, HAS_DOCS, False, PRECISION, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, b, stride_qt, stride_dt,
                             offs_n, full_end, end_last, T, qk_scale, D, BLOCK_D, BM, HAS_DOCS, True, PRECISION, UPCAST)
    tl.store(DK + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(DV + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=tile_mask)


_dq_tuned = triton.autotune(configs=_configs("bwd"), key=["BLOCK_D", "HAS_DOCS", "PRECISION", "UPCAST"])(_dq_kernel)
_dkdv_tuned = triton.autotune(configs=_configs("bwd"), key=["BLOCK_D", "HAS_DOCS", "PRECISION", "UPCAST"])(_dkdv_kernel)


# ----------------------------------------------------------------------------- launchers


def document_bounds(doc_offsets: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-local (start, end) of each token's document, (B, T) int32 each, on the device of
    doc_offsets, without a host sync: what the kernels read instead of the offsets."""
    return documents.bounds(doc_offsets, B, T)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, S, KV, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, T, H, D), (Bk, S, KV, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or S < T or H % KV:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k/v {tuple(k.shape)}: need the same B and D, "
                         "S >= T and H a multiple of KV")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported")
    if not (q.is_cuda or INTERPRET):
        raise RuntimeError("the Triton attention kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q: torch.Tensor) -> dict:
    D = q.shape[-1]
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRET and q.dtype == torch.bfloat16)


def attention_forward(q, k, v, starts=None):
    """Forward launcher: (out (B, T, H, D), lse (B, H, T) float32, base 2 of scaled scores)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(D)
    args = (q, k, v, out, lse, starts if starts is not None else lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            T, S, H, H // KV, sm_scale * LOG2E)
    meta = dict(_meta(q), HAS_DOCS=starts is not None)
    if T <= 16 and not INTERPRET:  # decoding: a short query tile, no autotuning per cache length
        BN = 64 if q.element_size() * meta["BLOCK_D"] <= 256 else 32  # fits shared memory up to fp32 x 256
        _fwd_kernel[(1, B * H)](*args, **meta, BM=16, BN=BN, num_warps=4, num_stages=2)
    else:
        _fwd_tuned[lambda m: (triton.cdiv(T, m["BM"]), B * H)](*args, **meta)
    return out, lse


def attention_backward(do, q, k, v, out, lse, starts=None, ends=None):
    """Backward launcher for S == T: (dq, dk, dv) in the inputs' dtypes."""
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))  # dq, dk, dv share their strides
    B, T, H, D = q.shape
    KV = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D)
    meta = _meta(q)
    delta = torch.empty_like(lse)
    BM = 16 if INTERPRET else 64
    _delta_kernel[(triton.cdiv(T, BM), B * H)](out, do, delta, *out.stride()[:3], *do.stride()[:3], T, H,
                                               D=D, BLOCK_D=meta["BLOCK_D"], BM=BM)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_docs = starts is not None
    _dq_tuned[lambda m: (triton.cdiv(T, m["BM"]), B * H)](
        q, k, v, do, dq, lse, delta, starts if has_docs else lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        T, H, H // KV, sm_scale * LOG2E, sm_scale, **meta, HAS_DOCS=has_docs)
    _dkdv_tuned[lambda m: (triton.cdiv(T, m["BN"]), B * KV)](
        q, k, v, do, dk, dv, lse, delta, starts if has_docs else lse, ends if has_docs else lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        T, H, KV, H // KV, sm_scale * LOG2E, sm_scale, **meta, HAS_DOCS=has_docs)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts, ends):
        out, lse = attention_forward(q, k, v, starts)
        ctx.save_for_backward(q, k, v, out, lse, starts, ends)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, starts, ends = ctx.saved_tensors
        if k.shape[1] != q.shape[1]:
            raise NotImplementedError("the backward covers training (S == T), not queries appended to a cache")
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, starts, ends)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_offsets: torch.Tensor | None = None,
                    bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention, q (B, T, H, D), k and v (B, S, KV, D) -> (B, T, H, D), scale 1/sqrt(D).

    doc_offsets: cumulative document offsets over the flattened B*T tokens (S == T only), or
    `bounds`, their document_bounds() computed once and shared by every layer. S > T appends the
    queries to S - T cached keys (forward only)."""
    _check(q, k, v)
    B, T = q.shape[:2]
    if doc_offsets is not None and bounds is None:
        bounds = document_bounds(doc_offsets, B, T)
    if bounds is not None and k.shape[1] != T:
        raise ValueError("document masking needs S == T (packed rows), not a KV cache")
    starts, ends = bounds if bounds is not None else (None, None)
    return FlashAttention.apply(q, k, v, starts, ends)
