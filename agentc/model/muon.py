"""Muon: momentum SGD whose update of each weight matrix is replaced by the nearest semi-orthogonal
matrix (all singular values set to 1), so every direction of the matrix moves by the same amount
instead of the few directions that dominate the raw gradient.

The orthogonalisation is an odd polynomial iteration X <- aX + b(XX^T)X + c(XX^T)^2 X on the
normalised update (Newton-Schulz): five steps bring the singular values that are not tiny (above
about 1e-2 of the norm) to roughly [0.7, 1.2], which is all the update needs, with only matrix
products (no SVD); tinier ones grow too, less far. The coefficients are the ones published with
Muon (K. Jordan et al., 2024), chosen to make the polynomial grow small singular values as fast
as possible while staying bounded.

Muon is for the hidden matrices of the blocks (attention and MLP projections). Embeddings, the LM
head and the norm gains stay with AdamW, as Muon's authors and most users keep them (train.py
--optimizer=muon builds both). State: one momentum buffer per matrix, like SGD, so checkpoints
and resumption work through the usual optimizer.state_dict().
"""
from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The (approximately) semi-orthogonal factor U V^T of g = U S V^T, for a 2-D g."""
    if g.dim() != 2:
        raise ValueError(f"orthogonalise expects a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm: every singular value now <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then orthogonalise, then scale by sqrt(max(1, rows / cols)) (Jordan's
    scaling): a step of RMS lr / sqrt(fan_in) per weight, whatever the matrix's shape, for weights
    stored [out, in] as nn.Linear does. Decoupled weight decay as in AdamW."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(f"bad Muon settings: lr={lr}, momentum={momentum}, ns_steps={ns_steps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon only takes matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                update = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        return loss


class Combined:
    """Several optimizers stepped as one (Muon for the block matrices, AdamW for the rest): one
    list of param_groups for the learning-rate schedule, one state dict for checkpoints. Every
    group carries `lr_scale`, its peak learning rate over the schedule's, so the loop sets
    group["lr"] = schedule(step) * group["lr_scale"] for all of them alike."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("lr_scale", 1.0)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state was written by a different --optimizer")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    muon: dict | None = None, fused: bool = False):
    """train.py's optimizer: AdamW with decoupled weight decay on matrices only (not norms or
    biases); with muon={"lr", "momentum", "weight_decay"}, Muon takes the 2-D weights inside the
    blocks (model.layers) and AdamW keeps the embeddings, the LM head and the norm gains."""
    hidden = [p for p in model.layers.parameters() if p.dim() == 2] if muon else []
    hidden_ids = {id(p) for p in hidden}
    matrices = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in hidden_ids]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                               {"params": vectors, "weight_decay": 0.0}], lr=lr, betas=betas, fused=fused)
    if not muon:
        return adamw
    return Combined(adamw, Muon([{"params": hidden, "lr_scale": muon["lr"] / lr}], lr=muon["lr"],
                                momentum=muon["momentum"], weight_decay=muon["weight_decay"]))
