"""Training throughput of the transformer: tokens/s, MFU (GPU) and peak memory of one optimizer
step (forward, backward, AdamW) on packed rows, with the attention and loss paths train.py uses.

    python experiments/bench_train.py --model=tiny --seq-len=4096 --batch-size=1            # CPU
    python experiments/bench_train.py --model=125m --seq-len=4096 --batch-size=8 --compile  # GPU
    torchrun --standalone --nproc_per_node=2 experiments/bench_train.py --model=small --parallel=fsdp  # or ddp

Under torchrun every rank trains --batch-size rows of its own (tokens/s counts all ranks), wrapped
as train.py wraps them: --parallel=ddp (DistributedDataParallel) or fsdp (FSDP2, agentc/model/
parallel.py), with --activation-checkpointing as in train.py.

Peak memory per rank: measured on a GPU (torch.cuda.max_memory_allocated) and predicted by the
memory model below on any device (predict_memory: weights, gradients, AdamW, FSDP's gathered
blocks, and the activations autograd keeps, counted on a 1- and a 2-block copy of the model);
--predict-only prints the prediction without training (will a 1B model at 32k fit?).

Rows are packed with documents of SQL-trajectory length (lengths drawn around --doc-len) and a
third of the tokens trained, like real shards; tokens are random (speed does not depend on them).
Writes experiments/results/DATE-train-MODEL-DEVICE-TSEQ.json with the device and versions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.util import write_json  # noqa: E402
from experiments.bench_util import device_name, machine, results_path, timed  # noqa: E402
from agentc.model.parallel import AC_MODES, checkpoint_activations, join_ranks, shard  # noqa: E402
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


# ----------------------------------------------------------------------------- memory model


def saved_bytes(cfg: ModelConfig, layers: int, batch: list, device: str, bf16: bool) -> int:
    """Bytes autograd keeps for the backward of a copy of `cfg`'s model with `layers` blocks, loss
    included, on `batch`: every saved tensor's storage counted once, the parameters left out
    (autocast's bf16 copies of them count: they live until the backward)."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg, n_layers=layers)).to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    tokens, targets, weights, offsets = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        model(tokens, offsets, targets, weights)
    return sum(seen.values())


def predict_memory(cfg: ModelConfig, batch: list, device: str, bf16: bool, ranks: int = 1, parallel: str = "none",
                   ac: str = "none") -> dict:
    """Bytes one rank holds at the peak of a training step (the end of the forward), by part.
    Activations are measured, not guessed: autograd's saved tensors for a 1- and a 2-block copy of
    the model on this batch, this device and these backends give one block's share and the rest's
    (embeddings, loss); the weights, gradients and AdamW's two moments are 4 bytes a parameter
    each, sharded over the ranks by FSDP. Left out: the backward's transient gradients of
    activations and the allocator's fragmentation (what max_memory_allocated shows beyond this)."""
    with torch.device("meta"):  # shapes only
        P = sum(p.numel() for p in Transformer(dataclasses.replace(cfg, n_layers=0)).parameters())  # outside blocks
        P_block = sum(p.numel() for p in Transformer(dataclasses.replace(cfg, n_layers=1)).layers.parameters())
    P_all = P + cfg.n_layers * P_block
    one, two = saved_bytes(cfg, 1, batch, device, bf16), saved_bytes(cfg, 2, batch, device, bf16)
    block = two - one                    # one block's saved activations (and, under autocast, its bf16 weights)
    rest = one - block                   # embeddings, rotary tables, final norm, loss
    if parallel == "fsdp" and bf16:      # FSDP gathers bf16 weights and frees them after each block's forward
        block -= 2 * P_block
    N = batch[0].numel()                 # tokens on this rank
    width = 2 if bf16 else 4
    kept = {"none": block,
            "block": 4 * N * cfg.dim,    # the block's input: the float32 residual stream
            "selective": 4 * N * cfg.dim + width * N * (2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
                                                        + 2 * cfg.ffn_dim + 2 * cfg.dim)}[ac]  # + matmul outputs
    shards = ranks if parallel == "fsdp" else 1
    parts = {"weights": 4 * P_all / shards, "gradients": 4 * P_all / shards, "adamw": 8 * P_all / shards,
             "activations": rest + cfg.n_layers * kept + (block if ac != "none" else 0)}  # + one block recomputed
    if parallel == "ddp":
        parts["ddp_buckets"] = 4 * P_all
    if parallel == "fsdp":               # the root's weights and two blocks gathered (one prefetched), one block's
        parts["fsdp_gathered"] = width * (P + 2 * P_block) + (width + 4) * P_block  # unsharded gradients
    parts["total"] = sum(parts.values())
    return parts


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
    ap.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                    help="under torchrun: how the ranks share the model (train.py: DDP by default, --fsdp)")
    ap.add_argument("--activation-checkpointing", default="none", choices=AC_MODES)
    ap.add_argument("--predict-only", action="store_true", help="print the memory model's prediction and stop")
    ap.add_argument("--out", default=None, help="JSON path (default: experiments/results/DATE-train-...json)")
    args = ap.parse_args()

    torch.manual_seed(0)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if (args.parallel != "none") != ("RANK" in os.environ):
        ap.error("--parallel=ddp or fsdp goes with torchrun, and torchrun with one of them")
    if args.parallel != "none":
        args.device = join_ranks(args.device)
    cuda = args.device.startswith("cuda")
    attention = resolve_backend(args.attn, args.device)
    loss_impl = resolve_backend(args.loss, args.device, "loss")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig.preset(args.model, vocab_size=args.vocab_size, max_seq_len=args.seq_len, attention=args.attn,
                             loss=args.loss)
    model = Transformer(cfg).to(args.device)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and native_bf16(args.device))
    checkpoint_activations(model, args.activation_checkpointing)
    step_model = model
    if args.parallel == "fsdp":
        if args.compile:
            for block in model.layers:
                block.compile()
        shard(model, bf16)
    elif args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        step_model = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    if args.compile and args.parallel != "fsdp":
        step_model = torch.compile(step_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(rank)  # each rank its own rows
    batch = packed_batch(args.batch_size, args.seq_len, args.vocab_size, args.doc_len, gen, args.device)
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16)
    predicted = predict_memory(cfg, batch, args.device, bf16, world, args.parallel, args.activation_checkpointing)
    if args.predict_only:
        print(json.dumps({k: f"{v / 2**20:,.1f} MiB" for k, v in predicted.items()}, indent=1))
        return

    def step():
        with autocast:
            loss = step_model(*batch[:1], batch[3], batch[1], batch[2])
        (loss / batch[2].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):  # not timed()'s warmup: the peak memory below counts the timed steps only
        step().item()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = timed(lambda: step().item(), args.steps, warmup=0)  # .item() waits for the GPU
    if world > 1:  # the slowest rank's times: a step ends when every rank's does
        every = [None] * world
        dist.all_gather_object(every, times)
        times = [max(ts) for ts in zip(*every)]
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch_size * args.seq_len * world
    dev_name = device_name(cuda)
    peak = peak_flops(dev_name) if cuda else None
    result = {
        "what": "one training step (fwd+bwd+AdamW) on packed rows", "model": args.model,
        "params": model.num_params(), "params_no_embeddings": model.num_params(False),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "doc_len": args.doc_len,
        "vocab_size": args.vocab_size, "compile": args.compile, "attention": attention, "loss": loss_impl,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * times[0], "tokens_per_s": tokens / median,
        "ranks": world, "parallel": args.parallel, "activation_checkpointing": args.activation_checkpointing,
        "mfu": flops_per_token(cfg, args.seq_len) * tokens / median / (peak * world) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "predicted_memory_gib": {k: v / 2**30 for k, v in predicted.items()},  # the memory model, per rank
        **machine(cuda), "steps": args.steps,
    }
    if args.parallel != "none":
        dist.destroy_process_group()
        if rank > 0:
            return
    # the device's usual precision (bf16 on a GPU, fp32 on a CPU) carries no suffix in the file name
    precision = "" if bf16 == cuda else "-bf16" if bf16 else "-fp32"
    how = (f"-{args.parallel}{world}" if args.parallel != "none" else "") + \
        (f"-ac{args.activation_checkpointing}" if args.activation_checkpointing != "none" else "")
    out = args.out or results_path(f"train-{args.model}-{'cuda' if cuda else 'cpu'}-T{args.seq_len}{precision}{how}")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
