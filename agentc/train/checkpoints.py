"""A training run's directory: checkpoints written so that a crash at any moment loses nothing,
checked when read back, and resumed on any number of ranks.

    OUT/step_NNNNNN/   model.safetensors + config.json   the weights (agentc.model.checkpoint)
                       agent.json + the tokenizer        with them, a compiled agent infer.py runs
                       optim_rankR.pt                    the optimizer state (each DDP node its copy)
                       dcp/                              or, under --fsdp, model and optimizer sharded by
                                                         torch.distributed.checkpoint (loads on M ranks)
                       meta.json                         written last: step, data position, RNG states,
                                                         flags, the SHA-256 of every file above
    OUT/latest         the name of the newest complete checkpoint

A checkpoint is written under a temporary name (.step_NNNNNN.tmp) and renamed when whole, then
`latest` is pointed at it; --resume takes the newest checkpoint whose files match their checksums.
Errors are ValueError with a message that names the file or directory (train.py prints one line).
Every function here is called on every rank: the collectives inside are matched across ranks.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from agentc.model import checkpoint
from agentc.runtime import agent as agent_dir
from agentc.util import atomic_write, read_json, write_text


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _steps(out: str) -> list[int]:
    """The steps of the checkpoints in OUT, oldest first."""
    if not os.path.isdir(out):
        return []
    return sorted(int(d[5:]) for d in os.listdir(out) if re.fullmatch(r"step_\d+", d))


# ----------------------------------------------------------------------------- finding one


def run_dir(out: str) -> str:
    """Where the run of --out lives: OUT itself, or under a W&B sweep agent OUT/<run id>, so that
    every run of the sweep gets its own directory."""
    run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    if run_id and os.path.basename(os.path.normpath(out)) != run_id:
        return os.path.join(out, run_id)
    return out


# The flags that define the model, which a resumed run cannot change, with the value that runs
# saved before the flag existed had.
MODEL_FLAGS = {"model": "", "model_config": "", "init_from": "", "copy_init": "false", "optimizer": "adamw",
               "rope_scaling": ""}


def as_choice(value):
    """--copy-init's value; runs saved before it took auto/true/false hold a bool."""
    return {True: "true", False: "false"}.get(value, value)


def changed_model_flag(out: str, saved_args: dict, args: dict) -> str | None:
    """The first flag of MODEL_FLAGS whose value in `args` differs from the run's (saved_args, the
    flags of OUT's checkpoint), as an error message; None when none does."""
    for k, before in MODEL_FLAGS.items():
        was = as_choice(saved_args.get(k, before))
        if was != as_choice(args[k]):
            return f"--{k.replace('_', '-')} cannot change when resuming (the run in {out} used {was!r})"
    return None


def latest(out: str) -> str | None:
    """The checkpoint OUT/latest names (None before the first): what --init-from=OUT starts from and
    what a new run refuses to overwrite."""
    try:
        path = agent_dir.latest(out)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if path and not os.path.exists(os.path.join(path, "meta.json")):
        raise ValueError(f"{out}/latest names {path}, which is not a complete checkpoint")
    return path


def resumable(out: str) -> tuple[str | None, dict]:
    """The newest checkpoint of OUT (not past the one `latest` names) whose files match the
    checksums its meta.json recorded, and that meta.json; (None, {}) when OUT has none. A damaged
    newer one (a torn write, a corrupted disk) is skipped with a warning; checkpoints older than the
    checksums are trusted. Called before the process group exists, so the rank comes from RANK."""
    try:
        newest = agent_dir.latest(out)
    except FileNotFoundError:  # `latest` names a checkpoint that is gone: look at what is there
        newest = None
    steps = _steps(out)[::-1]
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
        raise ValueError(f"--resume: no checkpoint in {out} is intact: "
                         + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped))
    return None, {}


# ----------------------------------------------------------------------------- preemption


def stop_on_signals(log) -> list:
    """The first SIGTERM or SIGINT (preemption, Ctrl-C) is appended to the list returned, so that the
    loop finishes its step, saves and exits; a second raises KeyboardInterrupt: stop now."""
    received = []

    def on_signal(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log(f"signal {signum}: saving after this step (again to abort)")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return received


# ----------------------------------------------------------------------------- random state


def rng_state(cuda: bool) -> dict:
    """This rank's random generators, as JSON (each rank saves its own)."""
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return {"torch": b64(torch.get_rng_state()), "cuda": b64(torch.cuda.get_rng_state().cpu()) if cuda else None,
            "python": random.getstate()[1]}


def set_rng_state(s: dict, cuda: bool) -> None:
    as_tensor = lambda x: torch.frombuffer(bytearray(base64.b64decode(x)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(s["torch"]))
    if s.get("cuda") and cuda:
        torch.cuda.set_rng_state(as_tensor(s["cuda"]))
    random.setstate((3, tuple(s["python"]), None))


# ----------------------------------------------------------------------------- saving


def _sharded_state(model, optimizer) -> dict:
    """The model and optimizer state as torch.distributed.checkpoint saves and loads it: keyed by
    parameter name, each rank holding its own shards (whole tensors without FSDP), so a checkpoint
    written on N ranks loads on M."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save(out: str, step: int, model, optimizer, meta: dict, agent: tuple[dict, dict, str | None], keep: int,
         fsdp: bool) -> str:
    """Write OUT/step_NNNNNN (on every rank; rank 0 writes the shared files) and point OUT/latest at
    it; keep the newest `keep` checkpoints (0: all). meta: what meta.json records besides the step,
    the RNG states, the world size and the checksums (data position, flags, model config...).
    agent: (the data's summary, the training summary, the tokenizer path) for the compiled agent's
    files (agentc/runtime/agent.py write). A failed write (a full disk) removes the partial
    directory and raises ValueError; the previous checkpoint stays. Returns the checkpoint's path."""
    tmp = os.path.join(out, f".step_{step:06d}.tmp")
    try:
        return _write(out, step, tmp, model, optimizer, meta, agent, keep, fsdp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous, free = agent_dir.latest(out), shutil.disk_usage(out).free
        raise ValueError(f"writing the checkpoint of step {step} to {out} failed ({type(e).__name__}: "
                         f"{str(e).strip()}; {free / 2**20:.1f} MB free on that disk); "
                         + (f"{previous} is intact: make room, then continue with --resume" if previous
                            else "there is no earlier checkpoint")) from None


def _write(out, step, tmp, model, optimizer, meta, agent, keep, fsdp) -> str:
    rank, world = _rank_world()
    final = os.path.join(out, f"step_{step:06d}")
    cuda = next(model.parameters()).device.type == "cuda"
    # FSDP: every rank sends its shards to rank 0 (on the CPU), which writes the whole model.safetensors
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if fsdp else None
    if rank == 0:
        for d in os.listdir(out):  # half-written checkpoints (and `latest` pointers) of a crash
            if d.startswith((".step_", ".latest.")) and d.endswith(".tmp"):
                path = os.path.join(out, d)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        os.makedirs(tmp)
        checkpoint.save(model, tmp, state_dict=whole)
        agent_dir.write(tmp, *agent)  # with its tokenizer and agent.json this directory is all infer.py needs
    _barrier()
    os.makedirs(tmp, exist_ok=True)  # on other nodes, without a shared file system
    if fsdp:  # each rank writes its own shards of the model and optimizer; rank 0 the metadata
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=os.path.join(tmp, "dcp"))
        own = (rng_state(cuda), {})
    else:  # DDP ranks hold the same optimizer state; each node writes its own copy
        state = optimizer.state_dict()
        optim_name = f"optim_rank{rank}.pt"
        atomic_write(os.path.join(tmp, optim_name), lambda path: torch.save(state, path))
        own = (rng_state(cuda), {optim_name: checkpoint.sha256(os.path.join(tmp, optim_name))})
    gathered = [own]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, own)
    _barrier()
    if rank == 0:
        files = {n: checkpoint.sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
                 if not n.startswith("optim_rank") and n != "dcp"}
        if fsdp:  # every rank's shard file (sharded checkpoints need a file system all nodes share)
            files.update({f"dcp/{n}": checkpoint.sha256(os.path.join(tmp, "dcp", n))
                          for n in sorted(os.listdir(os.path.join(tmp, "dcp")))})
        for g in gathered:
            files.update(g[1])
        meta = {"step": step, **meta, "rng": [g[0] for g in gathered], "world_size": world, "files": files}
        write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(os.path.join(out, "latest"), os.path.basename(final) + "\n")
        # keep the newest `keep`, this one included; never touch checkpoints past this step
        older = [s for s in _steps(out) if s < step]
        for s in older[:max(0, len(older) - keep + 1)] if keep > 0 else []:
            shutil.rmtree(os.path.join(out, f"step_{s:06d}"), ignore_errors=True)
    _barrier()
    return final


# ----------------------------------------------------------------------------- resuming


def restore(path: str, meta: dict, model, optimizer, loader, fsdp: bool) -> None:
    """Load checkpoint `path` (its meta.json already read, by resumable) into the model, the
    optimizer, the data loader's position and this rank's random generators. A checkpoint written
    with --fsdp (dcp/) loads on any number of ranks, with or without --fsdp; one written without it
    loads without it. Every rank must have found the same step."""
    rank, world = _rank_world()
    device = next(model.parameters()).device
    if os.path.isdir(os.path.join(path, "dcp")):
        state = _sharded_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        except Exception as e:  # torch raises CheckpointException, RuntimeError, ... for damaged or foreign files
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{path}/dcp: cannot load the sharded model and optimizer state "
                             f"({type(e).__name__}: {first})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif fsdp:
        raise ValueError(f"--fsdp cannot resume {path}: it was written without --fsdp (whole optimizer states "
                         "per rank, optim_rankR.pt); resume it without --fsdp")
    else:
        optim_file = os.path.join(path, f"optim_rank{rank}.pt")
        if not os.path.exists(optim_file):  # a different world size: DDP ranks hold identical optimizer states
            optim_file = os.path.join(path, "optim_rank0.pt")
        try:
            optim_state = torch.load(optim_file, map_location=device, weights_only=True)
        except Exception as e:  # torch raises EOFError, RuntimeError, KeyError... for a damaged file
            raise ValueError(f"{optim_file}: truncated or not an optimizer state ({type(e).__name__})") from None
        optimizer.load_state_dict(optim_state)
    try:
        loader.load_state_dict(meta["data"])
    except ValueError as e:
        raise ValueError(f"cannot resume {path} with these batch flags: {e}") from None
    if len(meta["rng"]) == world:
        set_rng_state(meta["rng"][rank], device.type == "cuda")
    if world > 1:  # each rank chose by itself (nodes without a shared file system check their own files)
        chosen = [None] * world
        dist.all_gather_object(chosen, meta["step"])
        if len(set(chosen)) > 1:
            raise ValueError(f"--resume: the ranks found different intact checkpoints (steps {chosen})")

