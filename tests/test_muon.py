"""Muon (model/muon.py): the Newton-Schulz iteration returns the orthogonal factor of odd-shaped
matrices, a Muon step descends, and train.py --optimizer=muon trains and resumes exactly."""
import copy

import pytest
import torch

from agentc.model.muon import Combined, Muon, orthogonalise
from test_train import metrics, saved_step, tiny_run, train


@pytest.mark.parametrize("shape", [(37, 11), (11, 37), (64, 64), (5, 129)])
def test_orthogonalise_gives_the_polar_factor(shape):
    g = torch.Generator().manual_seed(sum(shape))
    # singular values spread over four decades, the situation Muon is for
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, min(shape), dtype=torch.float64)
    m = (u * s) @ v.T
    out = orthogonalise(m.float()).double()
    assert out.shape == m.shape
    sv = torch.linalg.svdvals(out)
    # the quintic does not converge to 1 exactly: it pushes every singular value into about [0.7, 1.2]
    # (the smallest input ones, 1e-3 of the largest, a little lower), from 1e-3..1 before
    assert sv.max() < 1.25 and sv[: len(sv) * 3 // 4].min() > 0.6 and sv.min() > 0.2, sv
    polar = u @ v.T  # the exact orthogonal factor
    cos = (out * polar).sum() / (out.norm() * polar.norm())
    assert cos > 0.95, cos
    with pytest.raises(ValueError, match="matrix"):
        orthogonalise(torch.ones(3))


def test_muon_descends_and_round_trips_its_state():
    torch.manual_seed(0)
    target = torch.randn(24, 9)
    w = torch.nn.Parameter(torch.zeros(24, 9))
    b = torch.nn.Parameter(torch.zeros(9))
    opt = Combined(torch.optim.AdamW([b], lr=1e-2), Muon([{"params": [w], "lr_scale": 2.0}], lr=0.05))
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 2.0]
    x = torch.randn(64, 24)

    def loss():
        return ((x @ w + b - x @ target) ** 2).mean()
    first = loss().item()
    for i in range(60):  # Muon's steps do not shrink near the optimum: the schedule must decay
        for group in opt.param_groups:
            group["lr"] = 0.05 * group["lr_scale"] * (1 - i / 60)
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.05 * first
    # a copy restored from the state dict takes the identical next step
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    opt2 = Combined(torch.optim.AdamW([b2], lr=1e-2), Muon([w2], lr=0.05))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no shared buffers
    for o, p, q in ((opt, w, b), (opt2, w2, b2)):
        o.zero_grad()
        ((x @ p + q - x @ target) ** 2).mean().backward()
        o.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)
    with pytest.raises(ValueError, match="only takes matrices"):
        Muon([b], lr=0.1)
    with pytest.raises(ValueError, match="different --optimizer"):
        opt2.load_state_dict(torch.optim.AdamW([b2]).state_dict())


def test_one_step_by_hand():
    """From zero state: p <- p (1 - lr wd) - lr sqrt(max(1, out/in)) orthogonalise(g + m g)."""
    torch.manual_seed(3)
    for shape in ((13, 5), (5, 13)):
        p = torch.nn.Parameter(torch.randn(shape))
        g = torch.randn(shape)
        before = p.detach().clone()
        p.grad = g.clone()
        Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5).step()
        want = before * (1 - 0.1 * 0.5) - 0.1 * max(1.0, shape[0] / shape[1]) ** 0.5 * orthogonalise(g + 0.9 * g)
        torch.testing.assert_close(p.detach(), want)


@pytest.mark.slow
def test_train_py_with_muon_learns_and_resumes(calc_shards, tmp_path):
    flags = ("--max-steps=40", "--optimizer=muon", "--muon-lr=0.03", "--save-every=0")
    train(*tiny_run(calc_shards, tmp_path / "whole", *flags))
    whole = metrics(tmp_path / "whole")
    first, last = sum(whole[s] for s in (1, 2, 3)) / 3, sum(whole[s] for s in (38, 39, 40)) / 3
    assert last < 0.5 * first, (first, last)
    # both optimizers are in the checkpoint: Muon holds momentum for the 14 block matrices of `tiny`
    # (2 layers x q, k, v, o, gate, up, down), AdamW everything else, each parameter exactly once
    state = torch.load(tmp_path / "whole" / "step_000040" / "optim_rank0.pt", weights_only=True)
    adamw, muon = state["optimizers"]
    n_adamw = sum(len(g["params"]) for g in adamw["param_groups"])
    assert [len(g["params"]) for g in muon["param_groups"]] == [14] and len(muon["state"]) == 14
    from agentc.model import checkpoint
    model = checkpoint.load(str(tmp_path / "whole" / "step_000040"))
    assert n_adamw + 14 == len(list(model.parameters()))
    assert muon["param_groups"][0]["lr"] == pytest.approx(10 * adamw["param_groups"][0]["lr"])  # 0.03 / 3e-3
    out = tmp_path / "timed"
    train(*tiny_run(calc_shards, out, *flags, "--max-time=0.5s"))
    assert 0 < saved_step(out) < 40
    p = train("--out=" + str(out), "--resume", "--optimizer=adamw", check=False)
    assert p.returncode != 0 and "--optimizer cannot change when resuming" in p.stderr
    train("--out=" + str(out), "--resume")
    assert metrics(out) == whole
