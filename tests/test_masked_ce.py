"""kernels/masked_ce.py against kernels/reference.py: loss and the gradients of the hidden states
and of the head weight, over odd N, V = 1000 and 32003 (not a multiple of any tile), weight
patterns (all zero, all one, 30% trained, non-binary), z-loss, several chunks, float32 and bf16,
autocast. On the CPU the row kernel runs in Triton's interpreter (tests/conftest.py).

Tolerances: float32 against a float64 reference, 1e-5 relative; bf16 within 2x (+ a floor) of the
error the reference itself makes when computed from the same bf16 inputs."""
import json

import pytest
import torch

from agentc.kernels import reference
from agentc.kernels.masked_ce import default_chunk_rows, masked_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(N, V, d, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5 * 3
    y = torch.randint(0, V, (N,), generator=g)
    if pattern == "zero":
        w = torch.zeros(N, dtype=torch.float64)
    elif pattern == "one":
        w = torch.ones(N, dtype=torch.float64)
    elif pattern == "30%":
        w = (torch.rand(N, generator=g) < 0.3).double()
    else:  # non-binary weights, some zero
        w = torch.rand(N, generator=g, dtype=torch.float64) * 2 * (torch.rand(N, generator=g) < 0.6)
    return h, W, y, w


def rel(x, ref):
    assert torch.isfinite(x).all(), "non-finite result"
    floor = 1e-3 * ref.numel() ** 0.5  # exact zeros (all-zero weights) are judged on absolute error
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(floor)).item()


def run(fn, h, W, y, w, dtype, **kw):
    hh, WW = (t.detach().to(DEVICE, dtype).requires_grad_() for t in (h, W))
    loss = fn(hh, WW, y.to(DEVICE), w.to(DEVICE), **kw)
    loss.backward()
    return loss.detach(), hh.grad, WW.grad


@pytest.mark.parametrize("N,V,d,pattern", [
    (1, 1000, 16, "one"), (37, 1000, 32, "30%"), (37, 1000, 32, "zero"),
    pytest.param(101, 1000, 48, "weighted", marks=pytest.mark.slow),  # weights: also test_chunks_sum_and_no_grad_agree
    pytest.param(23, 32003, 16, "one", marks=pytest.mark.slow), pytest.param(57, 32003, 24, "30%", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_matches_reference_float32(N, V, d, pattern, z_loss):
    h, W, y, w = make(N, V, d, pattern, seed=N + V)
    ref = run(reference.masked_cross_entropy, h, W, y, w, torch.float64, z_loss=z_loss)
    got = run(masked_cross_entropy, h, W, y, w, torch.float32, z_loss=z_loss, chunk_rows=16)  # several chunks
    for name, a, b in zip(["loss", "dh", "dW"], got, ref):
        assert a.dtype == torch.float32
        assert rel(a, b) < 1e-5, f"{name}: {rel(a, b):.2e}"
    if pattern == "zero":
        assert got[0].item() == 0 and not got[1].any() and not got[2].any()


@pytest.mark.parametrize("N,V,pattern", [(37, 1000, "30%"), pytest.param(29, 32003, "one", marks=pytest.mark.slow)])
def test_matches_reference_bf16(N, V, pattern):
    h, W, y, w = make(N, V, 32, pattern, seed=N * 3 + V)
    ref = run(reference.masked_cross_entropy, h, W, y, w, torch.float64)
    base = run(reference.masked_cross_entropy, h, W, y, w, torch.bfloat16)  # PyTorch from the same bf16 inputs
    got = run(masked_cross_entropy, h, W, y, w, torch.bfloat16, chunk_rows=8)
    for name, a, b, c in zip(["loss", "dh", "dW"], got, base, ref):
        assert a.dtype == (torch.float32 if name == "loss" else torch.bfloat16)
        assert rel(a, c) <= 2 * rel(b, c) + 2e-3, f"{name}: {rel(a, c):.2e} vs PyTorch bf16 {rel(b, c):.2e}"


def test_chunks_sum_and_no_grad_agree():
    """One chunk or many, sum or mean, with or without gradients: the same numbers."""
    h, W, y, w = make(75, 1000, 16, "weighted", seed=3)
    args = [t.float().to(DEVICE) for t in (h, W)] + [y.to(DEVICE), w.to(DEVICE)]
    one = run(masked_cross_entropy, h, W, y, w, torch.float32, chunk_rows=1000)
    many = run(masked_cross_entropy, h, W, y, w, torch.float32, chunk_rows=7)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = masked_cross_entropy(*args)
        total = masked_cross_entropy(*args, reduction="sum")
    torch.testing.assert_close(plain, one[0])
    torch.testing.assert_close(total / w.sum().float(), one[0])
    assert default_chunk_rows(10) == 128 and default_chunk_rows(64000) == 2000 and default_chunk_rows(10**6) == 4096


def test_autocast_gives_float32_weight_gradient():
    """Under bf16 autocast (train.py on a GPU) the products run in bf16 and the float32 head weight
    gets a float32 gradient, as close to float64 as PyTorch's own autocast path."""
    h, W, y, w = make(41, 1000, 32, "30%", seed=9)
    ref = run(reference.masked_cross_entropy, h, W, y, w, torch.float64)
    device_type = "cuda" if DEVICE == "cuda" else "cpu"

    def under_autocast(fn):
        def f(*a, **kw):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return fn(*a, **kw)
        return f
    base = run(under_autocast(reference.masked_cross_entropy), h, W, y, w, torch.float32)
    got = run(under_autocast(masked_cross_entropy), h, W, y, w, torch.float32)
    assert got[2].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b, c in zip(["loss", "dh", "dW"], got, base, ref):
        assert rel(a, c) <= 2 * rel(b, c) + 2e-3, f"{name}: {rel(a, c):.2e} vs PyTorch autocast {rel(b, c):.2e}"


def test_bad_inputs_are_refused():
    h, W, y, w = (t.to(DEVICE) for t in make(5, 100, 8, "one", seed=1))
    with pytest.raises(ValueError, match="does not match"):
        masked_cross_entropy(h.float(), W[:, :4].float(), y, w)
    with pytest.raises(ValueError, match="targets"):
        masked_cross_entropy(h.float(), W.float(), y[:3], w)
    with pytest.raises(ValueError, match="reduction"):
        masked_cross_entropy(h.float(), W.float(), y, w, reduction="none")


@pytest.mark.slow
def test_ce_benchmark_runs_end_to_end(tmp_path, run_script):
    """experiments/bench_ce.py --smoke: every method at a tiny shape, all agreeing on the loss."""
    out = tmp_path / "ce.json"
    run_script("experiments/bench_ce.py", "--smoke", "--out", out, env={"TRITON_INTERPRET": "1"})
    r = json.loads(out.read_text())
    assert r["device"] and r["torch"] and r["triton"] and len(r["rows"]) == 8
    assert all("error" not in x and abs(x["loss_minus_ours"]) < 1e-4 and x["ms"] > 0 for x in r["rows"])
