"""Attention throughput: our Triton kernel against PyTorch SDPA's flash backend and FlexAttention.

    python experiments/bench_attention.py                  # a GPU: the full sweep, ~5 minutes
    python experiments/bench_attention.py --seq 16384 --head-dim 128
    TRITON_INTERPRET=1 python experiments/bench_attention.py --smoke   # CPU: tiny shapes, plumbing only

Every point: causal, bf16, B x N = --tokens tokens (B = tokens / N rows of N), H = --model-dim / D
heads (as many kv heads), forward and forward+backward, with and without documents. Documents have
random lengths (uniform in [--doc-min, --doc-max], the last one cut at the row's end); without
them each row is one causal sequence.

    ours        kernels/flash_attention.py (document bounds computed inside the timed call)
    sdpa-flash  F.scaled_dot_product_attention restricted to its FlashAttention-2 backend: causal
                only (it cannot take a document mask), so it runs the no-document points
    flex        torch.compile(flex_attention) with a causal (+ document) block mask, built
                outside the timed call, as a training loop would build it once per batch
    flash-attn  flash_attn_varlen_func, when the flash-attn package is installed

TFLOP/s in the FlashAttention convention: forward 4 * (attended pairs) * H * D with attended pairs
N^2 / 2 for a causal row and sum(L^2) / 2 over its documents with document masking; backward 2.5x
the forward, so forward+backward is 3.5x. Times are medians of triton.testing.do_bench (CUDA
events). Before timing, each method's output is checked against ours (relative error recorded).

Writes experiments/results/DATE-attention-DEVICE.json (device, versions, every point) and a plot.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.data.documents import document_ids  # noqa: E402
from agentc.kernels.flash_attention import flash_attention  # noqa: E402
from agentc.util import write_json  # noqa: E402
from experiments.bench_util import device_name, machine, results_path, timed  # noqa: E402

try:
    from flash_attn import flash_attn_varlen_func  # optional peer
except ImportError:
    flash_attn_varlen_func = None


def doc_offsets(B: int, N: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    cuts = [0]
    for b in range(B):
        t = 0
        while t < N:
            t = min(N, t + rng.randint(lo, hi))
            cuts.append(b * N + t)
    return torch.tensor(cuts, dtype=torch.int32)


def attended_pairs(off: torch.Tensor | None, B: int, N: int) -> float:
    """Query-key pairs a causal (document-masked) attention must compute: sum of L^2 / 2."""
    lengths = [N] * B if off is None else (off[1:] - off[:-1]).tolist()
    return sum(L * L / 2 for L in lengths)


def timer(fn, smoke: bool, grads=None) -> float:
    """Median milliseconds of fn() (grads: tensors whose .grad is reset between runs)."""
    if smoke:
        return 1e3 * statistics.median(timed(fn, 3))
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def methods(q, k, v, off, smoke: bool) -> dict:
    """name -> forward function of (q, k, v) in the model's (B, N, H, D) layout, for the methods
    that can compute this point."""
    B, N, H, D = q.shape
    out = {"ours": lambda q, k, v: flash_attention(q, k, v, off)}
    if off is None and not smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        out["sdpa-flash"] = sdpa_flash
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if off is not None:
        ids = document_ids(off.to(q.device), B, N)
        mask_mod = lambda b, h, i, j: (j <= i) & (ids[b, i] == ids[b, j])  # noqa: E731
    else:
        mask_mod = lambda b, h, i, j: j <= i  # noqa: E731
    block_mask = create_block_mask(mask_mod, B, None, N, N, device=q.device)
    flex = flex_attention if smoke else torch.compile(flex_attention)
    out["flex"] = lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       block_mask=block_mask).transpose(1, 2)
    if flash_attn_varlen_func is not None and not smoke:
        cu = (off if off is not None else torch.arange(0, B * N + 1, N, dtype=torch.int32)).to(q.device)
        max_len = int((cu[1:] - cu[:-1]).max())
        out["flash-attn"] = lambda q, k, v: flash_attn_varlen_func(
            q.reshape(B * N, H, D), k.reshape(B * N, H, D), v.reshape(B * N, H, D), cu, cu, max_len, max_len,
            causal=True).view(B, N, H, D)
    return out


def bench_point(N: int, D: int, docs: bool, args, device: str) -> list[dict]:
    B = max(1, args.tokens // N)
    H = max(1, args.model_dim // D)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(N * 1000 + D)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(device, dtype) for _ in range(3))
    off = doc_offsets(B, N, args.doc_min, args.doc_max, seed=N + D).to(device) if docs else None
    pairs = attended_pairs(off, B, N)
    fwd_flops = 4 * pairs * H * D
    do = torch.randn(B, N, H, D, generator=g).to(device, dtype)
    rows = []
    ours_out = None
    for name, fn in methods(q, k, v, off, args.smoke).items():
        row = {"method": name, "seq_len": N, "batch": B, "heads": H, "head_dim": D, "documents": docs,
               "n_docs": None if off is None else len(off) - 1, "attended_pairs": pairs}
        try:
            with torch.no_grad():
                o = fn(q, k, v)
            if name == "ours":
                ours_out = o.float()
            row["rel_err_vs_ours"] = float((o.float() - ours_out).norm() / ours_out.norm())
            t_fwd = timer(lambda: fn(q, k, v), args.smoke)
            row.update(fwd_ms=t_fwd, fwd_tflops=fwd_flops / t_fwd / 1e9)
            if not (args.smoke and name == "flex"):  # PyTorch has no flex backward on the CPU
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                t_all = timer(lambda: fn(qg, kg, vg).backward(do), args.smoke, grads=[qg, kg, vg])
                row.update(fwd_bwd_ms=t_all, fwd_bwd_tflops=3.5 * fwd_flops / t_all / 1e9)
        except Exception as e:  # a peer that cannot run this point is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append(row)
        print(f"N={N:6d} D={D:3d} docs={'yes' if docs else 'no ':3s} {name:11s} "
              + (f"fwd {row['fwd_tflops']:7.1f} TFLOP/s" if "fwd_tflops" in row else row.get("error", ""))
              + (f"  fwd+bwd {row['fwd_bwd_tflops']:7.1f} TFLOP/s" if "fwd_bwd_tflops" in row else ""), flush=True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def goals(rows: list[dict]) -> dict:
    """The kernel's goals at N = 16k, D = 128: forward at 450 TFLOP/s or more, forward+backward
    against SDPA's flash backend, and with documents against FlexAttention (None where a number
    is missing)."""
    def get(method, docs, key):
        return next((r.get(key) for r in rows if r["method"] == method and r["documents"] == docs
                     and r["seq_len"] == 16384 and r["head_dim"] == 128), None)
    ours_f, ours_fb = get("ours", False, "fwd_tflops"), get("ours", False, "fwd_bwd_tflops")
    sdpa_fb = get("sdpa-flash", False, "fwd_bwd_tflops")
    ours_doc, flex_doc = get("ours", True, "fwd_bwd_tflops"), get("flex", True, "fwd_bwd_tflops")
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    return {"fwd_tflops_16k_d128": ours_f, "fwd_goal_450": ours_f >= 450 if ours_f else None,
            "fwd_bwd_vs_sdpa_flash": ratio(ours_fb, sdpa_fb),
            "docs_fwd_bwd_vs_flex": ratio(ours_doc, flex_doc),
            "docs_fwd_vs_flex": ratio(get("ours", True, "fwd_tflops"), get("flex", True, "fwd_tflops"))}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 3.6 * len(dims)), squeeze=False)
    for i, D in enumerate(dims):
        for j, key in enumerate(["fwd_tflops", "fwd_bwd_tflops"]):
            ax = axes[i][j]
            for (method, docs) in sorted({(r["method"], r["documents"]) for r in rows}):
                pts = sorted((r["seq_len"], r[key]) for r in rows
                             if r["method"] == method and r["documents"] == docs and r["head_dim"] == D and key in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if docs else "--",
                            label=f"{method}{' (documents)' if docs else ' (causal)'}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{'forward' if j == 0 else 'forward + backward'}, head dim {D}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (B = tokens / N)")
    ap.add_argument("--model-dim", type=int, default=2048, help="H = model-dim / head-dim")
    ap.add_argument("--doc-min", type=int, default=128)
    ap.add_argument("--doc-max", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny shapes, float32, no timing claims")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/DATE-attention-DEVICE.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.seq, args.head_dim, args.tokens, args.model_dim = [48, 96], [16, 32], 96, 32
        args.doc_min, args.doc_max = 5, 40
    elif not cuda:
        ap.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the plumbing on the CPU)")
    device = "cuda" if cuda and not args.smoke else "cpu"
    import triton
    dev_name = device_name(device == "cuda")
    rows = []
    for D in args.head_dim:
        for N in args.seq:
            for docs in (False, True):
                rows.extend(bench_point(N, D, docs, args, device))
    result = {
        "what": "causal attention TFLOP/s (FlashAttention convention; documents count in-document pairs only)",
        **machine(device == "cuda"), "triton": triton.__version__, "cuda": torch.version.cuda,
        "flash_attn": getattr(sys.modules.get("flash_attn"), "__version__", None),
        "dtype": "float32" if args.smoke else "bfloat16", "smoke": args.smoke,
        "tokens_per_batch": args.tokens, "model_dim": args.model_dim,
        "doc_lengths": [args.doc_min, args.doc_max], "goals": goals(rows), "rows": rows,
    }
    slug = "smoke" if args.smoke else dev_name.replace("NVIDIA ", "").replace(" ", "_").lower()
    out = args.out or results_path(f"attention-{slug}")
    write_json(out, result)
    plot(rows, out.replace(".json", ".png"), f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}")
    print("goals:", json.dumps(result["goals"]))
    print(f"wrote {out} and {out.replace('.json', '.png')}")
    return result


if __name__ == "__main__":
    main()
