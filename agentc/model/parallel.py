"""Parallelism and memory savings applied to a Transformer from outside, by PyTorch's own tools:
activation checkpointing (torch.utils.checkpoint around each block's forward) and FSDP2
(torch.distributed.fsdp.fully_shard). Neither changes a checkpoint key: `model.state_dict()` names
the same tensors before and after (tests/test_parallel.py).

What each saves, per rank (experiments/bench_train.py's memory model does the arithmetic):
    --activation-checkpointing none       every block keeps its activations for the backward
                               block      each block keeps only its input and runs its forward
                                          again in the backward (about a third more compute)
                               selective  keeps the matmul outputs, recomputes the element-wise ops
                                          (norms, RoPE, SiLU): memory and compute between the two
    --fsdp (fully_shard per block)        parameters, gradients and AdamW's moments split over the
                                          ranks; one block at a time is gathered whole
"""
from __future__ import annotations

import os

import torch

from agentc.model.transformer import Transformer

AC_MODES = ("none", "block", "selective")

# Outputs worth keeping under selective checkpointing: the matrix multiplies and the fused
# attention ops (recomputing them is most of a forward). Everything else in a block is
# element-wise and cheap to run twice. Our Triton attention is an autograd.Function, not an aten
# op, so it is recomputed under either mode.
_SAVE_OPS = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def checkpoint_activations(model: Transformer, mode: str) -> None:
    """Recompute each block's activations in the backward instead of keeping them (mode 'block'),
    or keep only its matmul outputs ('selective'); 'none' leaves the model as it is. The block's
    forward is replaced by one that runs it under torch.utils.checkpoint: module hooks (FSDP2's
    gather and free) stay outside the recomputed region, and no parameter is renamed. Apply before
    fully_shard, as FSDP2's documentation orders them. Without gradients (evaluation, decoding)
    blocks run as before."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing is one of {', '.join(AC_MODES)}, got {mode!r}")
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint, noop_context_fn
    context = _selective_context if mode == "selective" else noop_context_fn
    for block in model.layers:
        def forward(*args, _inner=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context, **kwargs)
        block.forward = forward


def shard(model: Transformer, bf16: bool) -> None:
    """FSDP2: each block is one unit of sharding (gathered for its forward and backward, then freed),
    the embeddings, final norm and LM head the root's. Parameters stay float32 on every rank (the
    master copy the optimizer updates); with bf16 they are gathered and multiplied in bfloat16,
    and gradients are reduced in float32. Needs an initialised process group (torchrun)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)


def join_ranks(device: str, timeout=None) -> str:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on the CPU),
    or, in a plain process, make a group of one. Returns the device, under CUDA this rank's GPU
    (made current). train.py, infer.py and experiments/bench_train.py start their ranks here."""
    import torch.distributed as dist
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend, kw = ("nccl" if device.startswith("cuda") else "gloo"), ({"timeout": timeout} if timeout else {})
    if "RANK" in os.environ:
        dist.init_process_group(backend, **kw)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    return device


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP parameter, or the gradient norm clip_grad_norm_ returns for them) as the
    whole tensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t
