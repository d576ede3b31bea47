"""LoRA (Hu et al., 2021): train a low-rank update of each block's linear layers, the weights frozen.

    adapters = add_lora(model, rank=16, alpha=32)   # wq wk wv wo w_gate w_up w_down of every block
    ...train (the embeddings, norms and adapters; train.py --lora-rank)...
    checkpoint.save(merged(model), directory)       # plain weights, the same keys as any checkpoint

A wrapped layer computes  y = x W^T + scale * (x A^T) B^T  with W frozen, A (rank, in) random and
B (out, rank) zero, so the model starts exactly where the base is. Nothing computes dW: that is a
third of the blocks' training FLOPs saved, and the optimizer keeps moments for the adapters only.
Applied from outside the model file, like compile and DDP: `merged` folds W + scale * B A back into
plain nn.Linear layers for saving, so a compiled agent never knows LoRA was used.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.scale = alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)   # (out, in)


def _wrapped(model: nn.Module):
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name in TARGETS:
                if isinstance(getattr(parent, name, None), (nn.Linear, LoRALinear)):
                    yield parent, name


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every block's linear layers in place; return the adapters' parameters (A and B). The
    rest of the model (embeddings, norms) keeps its requires_grad: the caller decides."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    params = []
    for parent, name in _wrapped(model):
        layer = LoRALinear(getattr(parent, name), rank, alpha)
        setattr(parent, name, layer)
        params += [layer.lora_a, layer.lora_b]
    return params


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRALinear folded into an nn.Linear of weight W + scale * B A
    (the weights that are not adapted are shared with `model`, not copied)."""
    memo = {id(p): p for name, p in model.named_parameters() if "lora_" not in name and ".base." not in name}
    out = copy.deepcopy(model, memo)
    for parent, name in _wrapped(out):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            plain = layer.base
            with torch.no_grad():
                plain.weight = nn.Parameter(plain.weight + layer.delta().to(plain.weight.dtype), requires_grad=False)
            setattr(parent, name, plain)
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (saved beside a merged checkpoint so a run can resume)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Into a model whose weights are a merged checkpoint and that add_lora has wrapped: set the
    adapters and take their update back out of the frozen weights (W = merged - scale * B A, exact
    to float32 rounding), so the wrapped model computes what was saved."""
    missing = [k for k in adapter_state(model) if k not in state]
    if missing or len(state) != len(adapter_state(model)):
        raise ValueError(f"the adapters do not fit this model (missing {missing[:3]}, {len(state)} saved)")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for parent, name in _wrapped(model):
            layer = getattr(parent, name)
            layer.base.weight -= layer.delta().to(layer.base.weight.dtype)
