"""LM-head cross-entropy, forward + backward: time and peak extra memory of the fused, masked
kernel against PyTorch's paths.

    python experiments/bench_ce.py                      # a GPU: N 16k-64k, d 2048/4096, V 32k/128k, 30%/100% trained
    python experiments/bench_ce.py --n 16384 --d 4096 --vocab 131072
    TRITON_INTERPRET=1 python experiments/bench_ce.py --smoke   # CPU: tiny shapes, plumbing only

Methods (bf16 hidden states and head weight, N rows of which --share carry weight 1, the rest 0):
    ours            kernels/masked_ce.py: untrained rows dropped, logits one chunk at a time
    plain           logits = h @ W.T for every row, then F.cross_entropy (float32) weighted
    reference       kernels/reference.py's path as train.py's --loss=reference runs it: untrained
                    rows dropped, then the trained rows' full logits and F.cross_entropy
    linear-ce       F.linear_cross_entropy, untrained rows as ignore_index
    compiled        torch.compile of the reference path

Peak extra memory = the peak allocated during one forward+backward minus what is allocated
before it (inputs) and minus the gradients it leaves (dh, dW). The logits' size, N x V x 2 bytes,
is the yardstick (goal: extra under 5% of it). Times are medians of triton.testing.do_bench.
A method that runs out of memory is recorded as such. Writes experiments/results/DATE-ce-DEVICE.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.kernels.masked_ce import masked_cross_entropy  # noqa: E402
from agentc.util import write_json  # noqa: E402
from experiments.bench_util import device_name, machine, results_path, timed  # noqa: E402


def plain(h, W, y, w):
    loss = F.cross_entropy((h @ W.T).float(), y, reduction="none")
    return (loss * w).sum() / w.sum()


def reference_path(h, W, y, w):
    keep = w.nonzero().squeeze(1)
    loss = F.cross_entropy((h[keep] @ W.T).float(), y[keep], reduction="none")
    return (loss * w[keep]).sum() / w.sum()


def linear_ce(h, W, y, w):
    return F.linear_cross_entropy(h, W, torch.where(w > 0, y, -100), ignore_index=-100, reduction="mean")


def methods(smoke: bool) -> dict:
    out = {"ours": lambda h, W, y, w: masked_cross_entropy(h, W, y, w), "plain": plain,
           "reference": reference_path, "linear-ce": linear_ce}
    if not smoke:
        out["compiled"] = torch.compile(reference_path, dynamic=False)
    return out


def measure(fn, h, W, y, w, smoke: bool) -> dict:
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()

    def step():
        fn(hh, WW, y, w).backward()
    if smoke:
        def fresh_step():  # gradients set, not accumulated, as under do_bench's grad_to_none
            hh.grad = WW.grad = None
            step()
        return {"ms": 1e3 * statistics.median(timed(fresh_step, 3))}
    import triton.testing
    step()  # compile / autotune / warm up
    hh.grad = WW.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grads = hh.grad.numel() * hh.grad.element_size() + WW.grad.numel() * WW.grad.element_size()
    extra = torch.cuda.max_memory_allocated() - before - grads
    ms = triton.testing.do_bench(step, warmup=5, rep=50, grad_to_none=[hh, WW], return_mode="median")
    return {"ms": ms, "peak_extra_bytes": extra}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--d", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--share", type=float, nargs="+", default=[0.3, 1.0])
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny shapes, no timing claims")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.n, args.d, args.vocab = [64], [16], [1000]
    elif not cuda:
        ap.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the plumbing on the CPU)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    import triton
    dev_name = device_name(cuda)
    rows = []
    for V in args.vocab:
        for d in args.d:
            for N in args.n:
                g = torch.Generator().manual_seed(N + d + V)
                h = torch.randn(N, d, generator=g).to(device, dtype)
                W = (torch.randn(V, d, generator=g) / d ** 0.5).to(device, dtype)
                y = torch.randint(0, V, (N,), generator=g).to(device)
                for share in args.share:
                    w = (torch.rand(N, generator=g) < share).float().to(device)
                    logits_bytes = N * V * 2
                    ref_loss = None
                    for name, fn in methods(args.smoke).items():
                        row = {"method": name, "n": N, "d": d, "vocab": V, "trained_share": share,
                               "logits_bytes": logits_bytes}
                        try:
                            with torch.no_grad():
                                loss = fn(h, W, y, w).float().item()
                            ref_loss = loss if ref_loss is None else ref_loss
                            row["loss_minus_ours"] = loss - ref_loss
                            row.update(measure(fn, h, W, y, w, args.smoke))
                            if "peak_extra_bytes" in row:
                                row["extra_share_of_logits"] = row["peak_extra_bytes"] / logits_bytes
                        except torch.OutOfMemoryError:
                            row["error"] = "out of memory"
                        except Exception as e:  # recorded, not fatal
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        if cuda:
                            torch.cuda.empty_cache()
                        rows.append(row)
                        extra = (f"  extra {row['extra_share_of_logits']:6.1%} of logits"
                                 if "extra_share_of_logits" in row else "")
                        print(f"N={N:6d} d={d:5d} V={V:6d} trained={share:4.0%} {name:10s} "
                              + (f"{row['ms']:9.2f} ms{extra}" if "ms" in row else row.get("error", "")), flush=True)
                del h, W, y
    result = {"what": "LM-head cross-entropy forward+backward: time, peak extra memory",
              **machine(cuda), "triton": triton.__version__, "cuda": torch.version.cuda,
              "dtype": str(dtype).replace("torch.", ""), "smoke": args.smoke, "rows": rows}
    slug = "smoke" if args.smoke else dev_name.replace("NVIDIA ", "").replace(" ", "_").lower()
    out = args.out or results_path(f"ce-{slug}")
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
