"""Training throughput of the transformer: tokens/s, MFU (GPU) and peak memory of one optimizer
step (forward, backward, AdamW) on packed rows, with the attention and loss paths train.py uses.

    python experiments/bench_train.py --model=tiny --seq-len=4096 --batch-size=1            # CPU
    python experiments/bench_train.py --model=125m --seq-len=4096 --batch-size=8 --compile  # GPU

Rows are packed with documents of SQL-trajectory length (lengths drawn around --doc-len) and a
third of the tokens trained, like real shards; tokens are random (speed does not depend on them).
Writes experiments/results/DATE-train-MODEL-DEVICE-TSEQ.json with the device and versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.model.transformer import (BACKENDS, LOSSES, PRESETS, ModelConfig, Transformer, flops_per_token,  # noqa: E402
                                      native_bf16, peak_flops, resolve_backend)


def packed_batch(B, T, vocab, doc_len, gen, device):
    tokens = torch.randint(0, vocab, (B, T), generator=gen)
    targets = torch.randint(0, vocab, (B, T), generator=gen)
    weights = (torch.rand(B, T, generator=gen) < 1 / 3).float()
    offsets, pos = [0], 0
    for b in range(B):
        end = (b + 1) * T
        while pos < end:
            pos = min(end, pos + int(torch.randint(doc_len // 2, doc_len * 3 // 2 + 1, (1,), generator=gen)))
            offsets.append(pos)
    return [t.to(device) for t in (tokens, targets, weights, torch.tensor(offsets, dtype=torch.int32))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=list(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--doc-len", type=int, default=406, help="mean document length (SQL: 406 tokens)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="matmul precision: auto = bfloat16 autocast where the device multiplies it natively "
                         "(a GPU, a CPU with AVX512-BF16 or AMX), else float32")
    ap.add_argument("--attn", default="auto", choices=BACKENDS, help="attention backend (agentc/model/transformer.py)")
    ap.add_argument("--loss", default="auto", choices=LOSSES, help="LM-head loss (agentc/model/transformer.py)")
    ap.add_argument("--out", default=None, help="JSON path (default: experiments/results/DATE-train-...json)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    attention = resolve_backend(args.attn, args.device)
    loss_impl = resolve_backend(args.loss, args.device, "loss")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig.preset(args.model, vocab_size=args.vocab_size, max_seq_len=args.seq_len, attention=args.attn,
                             loss=args.loss)
    model = Transformer(cfg).to(args.device)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(0)
    batch = packed_batch(args.batch_size, args.seq_len, args.vocab_size, args.doc_len, gen, args.device)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and native_bf16(args.device))
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = step_model(*batch[:1], batch[3], batch[1], batch[2])
        (loss / batch[2].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step().item()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step().item()  # .item() waits for the GPU
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch_size * args.seq_len
    dev_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    peak = peak_flops(dev_name) if cuda else None
    result = {
        "what": "one training step (fwd+bwd+AdamW) on packed rows", "model": args.model,
        "params": model.num_params(), "params_no_embeddings": model.num_params(False),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "doc_len": args.doc_len,
        "vocab_size": args.vocab_size, "compile": args.compile, "attention": attention, "loss": loss_impl,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * times[0], "tokens_per_s": tokens / median,
        "mfu": flops_per_token(cfg, args.seq_len) * tokens / median / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": dev_name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "steps": args.steps,
    }
    # the device's usual precision (bf16 on a GPU, fp32 on a CPU) carries no suffix in the file name
    precision = "" if bf16 == cuda else "-bf16" if bf16 else "-fp32"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{datetime.date.today()}-train-{args.model}-{'cuda' if cuda else 'cpu'}-T{args.seq_len}"
                                   f"{precision}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
