"""kernels/flash_attention.py against kernels/reference.py: output and dq, dk, dv over odd lengths,
random document splits (length-1 documents included), GQA ratios 1/4/8, every supported head dim,
and the cache-append mode. On the CPU the kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), so the shapes stay small; on a GPU the same tests run compiled, plus
larger ones.

Tolerances: float32 kernels against a float64 reference to 1e-5 (relative Frobenius error); bf16
and fp16 kernels must be within 2x (+ a small floor) of the error PyTorch's own computation in the
same dtype makes against float64 (the FlashAttention tests' criterion)."""
import json
import random

import pytest
import torch

from agentc.kernels import reference
from agentc.kernels.flash_attention import document_bounds, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter-heavy on the CPU: the default run keeps one or two shapes of each test (the forward and
# backward kernels, bf16, the cache-append mode); `pytest -m slow` runs the other shapes
SLOW = pytest.mark.slow


def random_offsets(rng: random.Random, B: int, T: int, max_docs: int = 6) -> torch.Tensor:
    """cu_seqlens over B rows of T tokens: each row cut at random points, often making length-1
    documents."""
    cuts = [0]
    for b in range(B):
        inner = sorted(rng.sample(range(1, T), min(T - 1, rng.randint(0, max_docs)))) if T > 1 else []
        if T > 3 and rng.random() < 0.5:  # force a length-1 document somewhere
            i = rng.randrange(1, T - 1)
            inner = sorted(set(inner) | {i, i + 1})
        cuts += [b * T + c for c in inner] + [(b + 1) * T]
    return torch.tensor(cuts, dtype=torch.int32)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, with ||ref|| floored at an RMS of 0.1 per element: some exact
    gradients are zero (T = 1: dq = dk = 0), and there only the absolute error means anything."""
    assert not torch.isnan(x).any(), "NaN in the kernel's result"
    floor = 0.1 * ref.numel() ** 0.5
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(floor)).item()


def inputs(B, T, S, H, KV, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, KV, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, KV, D, generator=g, dtype=torch.float64)
    return q, k, v


def check(B, T, H, KV, D, docs: bool, dtype, seed, S=None):
    """Forward (and, for S == T, backward) of the kernel in `dtype` against the float64
    reference; returns nothing, asserts."""
    S = S or T
    q64, k64, v64 = (t.requires_grad_() for t in inputs(B, T, S, H, KV, D, seed))
    off = random_offsets(random.Random(seed), B, T) if docs else None
    ref = reference.attention(q64, k64, v64, off)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), dout) if S == T else None

    def run(impl, dt, device):
        q, k, v = (t.detach().to(device=device, dtype=dt).requires_grad_() for t in (q64, k64, v64))
        o = impl(q, k, v, None if off is None else off.to(device))
        if S != T:
            return o, None
        return o, torch.autograd.grad(o, (q, k, v), dout.to(device=device, dtype=dt))

    out, grads = run(flash_attention, dtype, DEVICE)
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        limits = [1e-5] * 4
    else:  # PyTorch's own computation in this dtype sets the bar (on the CPU for bf16/fp16 too)
        t_out, t_grads = run(reference.attention, dtype, DEVICE)
        base = [rel_err(t_out, ref)] + ([rel_err(a, b) for a, b in zip(t_grads, grads64)] if grads64 else [])
        limits = [2 * e + 2e-3 for e in base]
    errs = [rel_err(out, ref)] + ([rel_err(a, b) for a, b in zip(grads, grads64)] if grads64 else [])
    for name, e, lim in zip(["out", "dq", "dk", "dv"], errs, limits):
        assert e <= lim, f"{name}: relative error {e:.2e} > {lim:.2e} (B={B} T={T} S={S} H={H} KV={KV} D={D} docs={docs})"


@pytest.mark.parametrize("T,H,KV,D,docs", [
    (1, 4, 4, 64, False),     # in the default run: these two (runs/gpu_check.sh --dry-run names them)
    (17, 4, 1, 80, True),     # GQA 4
    pytest.param(17, 2, 2, 96, False, marks=SLOW),
    pytest.param(100, 8, 1, 96, True, marks=SLOW),    # GQA 8
    pytest.param(100, 4, 4, 64, True, marks=SLOW),
    pytest.param(257, 8, 2, 128, True, marks=SLOW),
    pytest.param(257, 2, 1, 64, False, marks=SLOW),
    pytest.param(17, 8, 1, 128, True, marks=SLOW),    # GQA 8
    pytest.param(17, 2, 1, 256, True, marks=SLOW),    # the largest head dim the kernel takes
    pytest.param(40, 2, 2, 16, True, marks=SLOW),     # the smallest tile width
])
def test_matches_reference_float32(T, H, KV, D, docs):
    check(2 if T < 200 else 1, T, H, KV, D, docs, torch.float32, seed=T * 31 + D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=SLOW)])
@pytest.mark.parametrize("T,H,KV,D", [(17, 4, 1, 64), pytest.param(100, 4, 2, 128, marks=SLOW)])
def test_matches_reference_half(dtype, T, H, KV, D):
    check(2, T, H, KV, D, True, dtype, seed=T + D)


@pytest.mark.parametrize("T,S", [(1, 1), pytest.param(1, 40, marks=SLOW),
                                 pytest.param(5, 40, marks=SLOW), (17, 17 + 33), pytest.param(20, 100, marks=SLOW)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_append_matches_full_attention(T, S, dtype):
    """Queries appended to S - T cached keys (bottom-right causal) equal the last T rows of full
    causal attention over all S tokens: what the runtime's prefill-then-append relies on."""
    check(2, T, 4, 2, 64, False, dtype, seed=T * 7 + S, S=S)
    q, k, v = inputs(1, S, S, 4, 2, 64, seed=S)
    full = reference.attention(q, k, v)
    part = flash_attention(*(t.to(DEVICE, torch.float32) for t in (q[:, S - T:], k, v)))
    assert rel_err(part, full[:, S - T:]) < 1e-5


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_masked_tiles_are_skipped_not_computed():
    """Keys and values of the first document are NaN: if any tile of them were loaded and merely
    masked for the other documents' queries, NaN * 0 would leak into their outputs and
    gradients. Same for the future half of a single document (causal skipping)."""
    T, H, KV, D = 256, 2, 1, 32
    q, k, v = (t.float().to(DEVICE) for t in inputs(1, T, T, H, KV, D, seed=5))
    off = torch.tensor([0, 128, 256], dtype=torch.int32, device=DEVICE)  # tile-aligned for any BM, BN <= 128
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :128], v_bad[:, :128] = float("nan"), float("nan")
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k_bad, v_bad))
    out = flash_attention(q_, k_, v_, off)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), dout)
    ref_q, ref_k, ref_v = (t[:, 128:].double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(ref_q, ref_k, ref_v)
    rdq, rdk, rdv = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), dout[:, 128:].double())
    for got, want in [(out, ref), (dq, rdq), (dk, rdk), (dv, rdv)]:
        assert rel_err(got[:, 128:], want) < 1e-5

    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, 128:], v_bad[:, 128:] = float("nan"), float("nan")  # the future of queries < 128
    out = flash_attention(q, k_bad, v_bad)
    assert rel_err(out[:, :128], reference.attention(q.double(), k.double(), v.double())[:, :128]) < 1e-5


def test_document_bounds():
    off = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)  # row 0: docs of 3, 5; row 1: 2, 6
    starts, ends = document_bounds(off, 2, 8)
    assert starts.tolist() == [[0, 0, 0, 3, 3, 3, 3, 3], [0, 0, 2, 2, 2, 2, 2, 2]]
    assert ends.tolist() == [[3, 3, 3, 8, 8, 8, 8, 8], [2, 2, 8, 8, 8, 8, 8, 8]]


def test_bad_inputs_are_refused():
    q = torch.randn(1, 8, 4, 16, device=DEVICE)
    k = torch.randn(1, 8, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="S >= T"):
        flash_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(TypeError, match="share"):
        flash_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="256"):
        big = torch.randn(1, 2, 1, 512, device=DEVICE)
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match="S == T"):
        flash_attention(q, torch.cat([q, q], 1), torch.cat([q, q], 1), torch.tensor([0, 8], device=DEVICE))
    x = torch.randn(1, 4, 2, 16, device=DEVICE, requires_grad=True)
    out = flash_attention(x, torch.cat([x, x], 1), torch.cat([x, x], 1))
    with pytest.raises(NotImplementedError, match="cache"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,KV,D", [(1000, 8, 2, 128), (2048, 16, 16, 64), (1531, 12, 4, 80), (777, 8, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_larger_shapes(T, H, KV, D, dtype):
    check(2, T, H, KV, D, True, dtype, seed=T)
    check(1, T, H, KV, D, False, dtype, seed=T + 1)


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path, run_script):
    """Our kernels (these and the fused loss's) compile for sm_90 (no GPU needed: Triton carries
    ptxas), which the CPU interpreter does not check (constexpr globals, layouts), and their
    products run on tensor cores: wgmma for the forward, which also keeps everything in registers
    at head dim 128."""
    out = tmp_path / "report.json"
    run_script("experiments/kernel_report.py", "--quick", "--head-dim", "128", "--out", out, timeout=600)
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fwd", "dq", "dkdv", "ce_rows"}  # ce_rows: kernels/masked_ce.py
    assert rows["ce_rows"]["stack_bytes"] == 0
    assert rows["fwd"]["hgmma"] > 0 and rows["fwd"]["stack_bytes"] == 0
    assert all(rows[k]["hgmma"] + rows[k]["hmma"] > 0 for k in ("fwd", "dq", "dkdv"))


@pytest.mark.slow
def test_attention_benchmark_runs_end_to_end(tmp_path, run_script):
    """experiments/bench_attention.py --smoke: every method, point, JSON field and the plot, on
    tiny shapes (the GPU run takes the same code path with do_bench timing and bf16)."""
    out = tmp_path / "att.json"
    run_script("experiments/bench_attention.py", "--smoke", "--out", out, env={"TRITON_INTERPRET": "1"})
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] and r["torch"] and r["triton"] and (tmp_path / "att.png").exists()
    ours = [x for x in r["rows"] if x["method"] == "ours"]
    assert len(ours) == 8 and all("fwd_bwd_tflops" in x and "error" not in x for x in ours)
    flex = [x for x in r["rows"] if x["method"] == "flex"]
    assert len(flex) == 8 and all(x["rel_err_vs_ours"] < 1e-5 for x in flex)  # the two agree
