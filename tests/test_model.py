"""The transformer on packed rows: documents never see each other and positions restart, so a
packed row's loss (and gradient) is the sum of its trajectories' losses computed one at a time."""
import math

import pytest
import torch

from agentc.model import transformer
from agentc.data.loader import Loader
from agentc.model.transformer import (Documents, ModelConfig, Transformer, apply_rope, flops_per_token, lm_loss,
                                      rope_cos_sin, rope_frequencies)


def tiny(vocab, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=vocab, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "qkv_bias": True, "n_kv_heads": 1}])
def test_packed_row_equals_its_documents_alone(calc_shards, kw, dtype):
    """Loss within 1e-5 in float32; loss and every gradient within 1e-10 in float64."""
    loader = Loader(calc_shards["train"], batch_size=3, seed=1)
    b = loader.next_batch()
    model = tiny(calc_shards["vocab_size"], **kw).to(dtype)
    with torch.no_grad():  # random biases and norms, so nothing in the comparison is trivially 0 or 1
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    packed = model(b.tokens, b.doc_offsets, b.targets, b.loss_weights)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))

    flat = [t.reshape(1, -1) for t in (b.tokens, b.targets, b.loss_weights)]
    off = b.doc_offsets.tolist()
    trained_docs = [s for s, e in zip(off[:-1], off[1:]) if flat[2][0, s:e].sum() > 0]
    assert len(trained_docs) >= 2 * 3  # several trained documents per row, or the test shows nothing
    alone = 0
    for s, e in zip(off[:-1], off[1:]):
        tok, tgt, w = (t[:, s:e] for t in flat)
        alone = alone + model(tok, None, tgt, w)
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    assert packed.item() > 0
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(packed, alone, rtol=tol, atol=tol)
    if dtype == torch.float64:
        for g1, g2 in zip(packed_grads, alone_grads):
            torch.testing.assert_close(g1, g2, rtol=tol, atol=tol)


def test_document_mask_and_positions():
    off = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)  # row 0: docs of 3, 5; row 1: 2, 6
    docs = Documents.from_offsets(off, 2, 8, None, "cpu")
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]
    m = docs.mask()[:, 0]
    assert m[0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert m[1, 1].tolist() == [True, True] + [False] * 6
    w = Documents.from_offsets(off, 2, 8, 2, "cpu").mask()[:, 0]  # window 2: itself and one before
    assert w[1, 5].tolist() == [False] * 4 + [True, True, False, False]
    with pytest.raises(ValueError, match="row start"):
        Documents.from_offsets(torch.tensor([0, 5, 16]), 2, 8, None, "cpu")  # a document across rows
    with pytest.raises(ValueError, match="0 to B"):
        Documents.from_offsets(torch.tensor([0, 8, 15]), 2, 8, None, "cpu")


@pytest.mark.parametrize("doc_loop", [True, False])
def test_attention_matches_explicit_softmax_in_float64(doc_loop, monkeypatch):
    """The attention dispatch (its per-document loop and its dense-mask path) against a loop over
    documents written out by hand (GQA, window)."""
    monkeypatch.setattr(transformer, "DOC_LOOP_ON_CPU", doc_loop)
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 13, 6, 2, 8
    off = torch.tensor([0, 4, 13, 20, 26], dtype=torch.int32)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k, v = torch.randn(2, B, T, KV, D, dtype=torch.float64)
    from agentc.model.transformer import attend
    for window in (None, 3):
        out = attend(q, k, v, Documents.from_offsets(off, B, T, window, "cpu"))
        ref = torch.zeros_like(q)
        for s, e in zip(off[:-1].tolist(), off[1:].tolist()):
            b, s, e = s // T, s % T, (e - 1) % T + 1
            for i in range(s, e):
                lo = s if window is None else max(s, i - window + 1)
                for h in range(H):
                    kv = h // (H // KV)
                    att = torch.softmax(k[b, lo:i + 1, kv] @ q[b, i, h] / math.sqrt(D), 0)
                    ref[b, i, h] = att @ v[b, lo:i + 1, kv]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_cpu_document_loop_under_bfloat16_autocast(monkeypatch):
    """Under CPU bfloat16 autocast the per-document loop computes in float32 on the bfloat16
    projections and hands bfloat16 back: equal to the float64 softmax of those same inputs to
    bfloat16's precision, gradients included."""
    monkeypatch.setattr(transformer, "DOC_LOOP_ON_CPU", True)
    seen = []
    sdpa = transformer.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        seen.append((q.dtype, k.dtype, v.dtype, out.dtype))
        return out
    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(1)
    B, T, H, D = 2, 19, 4, 16
    off = torch.tensor([0, 7, 19, 30, 38], dtype=torch.int32)
    q, k, v = (torch.randn(B, T, H, D).bfloat16().requires_grad_() for _ in range(3))
    docs = Documents.from_offsets(off, B, T, None, "cpu")
    from agentc.model.transformer import _attend_reference, attend
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, docs)
    assert out.dtype == torch.bfloat16
    assert len(seen) == 4 and set(seen) == {(torch.float32,) * 4}  # one call per document, in float32
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _attend_reference(q64, k64, v64, docs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    g = torch.randn_like(ref)
    out.backward(g.bfloat16())
    ref.backward(g)
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=3e-2, atol=3e-2)


def test_rope_rotates_by_relative_position():
    """q.k after RoPE depends only on the distance between positions, and llama3/linear scaling
    slow the low frequencies down."""
    cfg = ModelConfig.preset("tiny", vocab_size=10, head_dim=16)
    f = rope_frequencies(cfg)
    q, k = torch.randn(2, 1, 1, 1, 16)
    def dot(i, j):
        cos, sin = rope_cos_sin(torch.tensor([[i, j]]), f)
        return (apply_rope(q, cos[:, :1], sin[:, :1]) * apply_rope(k, cos[:, 1:], sin[:, 1:])).sum()
    torch.testing.assert_close(dot(5, 2), dot(103, 100))
    lin = rope_frequencies(ModelConfig.preset("tiny", vocab_size=10, rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(lin, rope_frequencies(ModelConfig.preset("tiny", vocab_size=10)) / 4)
    l3 = rope_frequencies(ModelConfig.preset("tiny", vocab_size=10, head_dim=64, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 64}))
    base = rope_frequencies(ModelConfig.preset("tiny", vocab_size=10, head_dim=64))
    assert l3[0] == base[0] and torch.isclose(l3[-1], base[-1] / 8)  # fastest kept, slowest / factor
    assert ((l3 <= base) & (l3 >= base / 8)).all()


def test_loss_is_weighted_sum_over_trained_tokens():
    torch.manual_seed(0)
    h, W = torch.randn(2, 5, 8), torch.randn(11, 8)
    t, w = torch.randint(0, 11, (2, 5)), torch.tensor([[0, 1, 1, 0, 0.5], [0, 0, 2, 1, 0]])
    ce = torch.nn.functional.cross_entropy((h @ W.T).view(-1, 11), t.view(-1), reduction="none")
    torch.testing.assert_close(lm_loss(h, W, t, w), (ce * w.view(-1)).sum())
    assert lm_loss(h, W, t, torch.zeros(2, 5)).item() == 0


def test_config_errors_and_accounting():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(rope_scaling={"type": "yarn", "factor": 2})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"dim": 64, "n_head": 4})
    cfg = ModelConfig.preset("125m", vocab_size=8192)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with torch.device("meta"):
        m = Transformer(cfg)
    # 6 FLOPs per matmul weight per token (+ attention): the non-embedding count plus the LM head
    assert flops_per_token(cfg, 0) == 6 * (m.num_params(False) - 2 * cfg.n_layers * cfg.dim - cfg.dim + 8192 * 768)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_backends_agree_on_loss_and_every_gradient(monkeypatch):
    """The model's loss and the gradient of every parameter are the same whichever attention
    backend runs (packed rows with a length-1 document, GQA). On the CPU, PyTorch's flex
    attention has no backward, so there it is checked on the loss only."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    model = Transformer(cfg)
    B, T = 2, 29
    x, y = torch.randint(0, 61, (2, B, T))
    w = (torch.rand(B, T) > 0.3).float()
    off = torch.tensor([0, 11, 12, 29, 40, 58], dtype=torch.int32)
    results = {}
    for name in ["sdpa", "sdpa-dense", "reference", "triton", "flex"]:
        monkeypatch.setattr(transformer, "DOC_LOOP_ON_CPU", name != "sdpa-dense")
        model.cfg.attention = name.split("-")[0]
        model.zero_grad()
        if name == "flex" and not torch.cuda.is_available():
            with torch.no_grad():
                results[name] = (model(x, off, y, w), None)
            continue
        loss = model(x, off, y, w)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_loss, ref_grads = results["reference"]
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=f"{name} loss")
        for n, g in (grads or {}).items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {n}")


def test_fused_loss_agrees_with_reference_on_loss_and_every_gradient(monkeypatch):
    """loss fused (agentc/kernels/masked_ce.py, the interpreter on CPU) and reference give the
    model the same loss and the same gradient for every parameter, tied head included."""
    torch.manual_seed(0)
    for tie in (False, True):
        cfg = ModelConfig(vocab_size=301, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                          tie_embeddings=tie)
        model = Transformer(cfg)
        x, y = torch.randint(0, 301, (2, 2, 23))
        w = (torch.rand(2, 23) > 0.6).float() * 1.5
        off = torch.tensor([0, 9, 23, 24, 46], dtype=torch.int32)
        results = {}
        for name in ("reference", "fused"):
            model.cfg.loss = name
            model.zero_grad()
            loss = model(x, off, y, w)
            loss.backward()
            results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        (ref_loss, ref_grads), (loss, grads) = results["reference"], results["fused"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"gradient of {n} (tied={tie})")


def test_unknown_or_unavailable_backend_is_refused(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown attention backend"):
        transformer.resolve_backend("flash3", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        ModelConfig.preset("tiny", attention="flash3")
    with pytest.raises(ValueError, match="unknown loss"):
        ModelConfig.preset("tiny", loss="liger")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        transformer.resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        transformer.resolve_backend("fused", "cpu", "loss")
    assert transformer.resolve_backend("auto", "cpu") == "sdpa"
    assert transformer.resolve_backend("auto", "cpu", "loss") == "reference"
    assert transformer.resolve_backend("auto", "cuda") == "triton"
    # the backends are the loader's choice: a checkpoint does not carry them
    from agentc.model import checkpoint
    model = Transformer(ModelConfig.preset("tiny", vocab_size=50, attention="reference", loss="reference"))
    checkpoint.save(model, str(tmp_path))
    again = checkpoint.load(str(tmp_path))
    assert (again.cfg.attention, again.cfg.loss) == ("auto", "auto")
    assert "attention" not in (tmp_path / "config.json").read_text()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attn", ["sdpa", "triton", "flex", "reference"])
@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_chunks_equal_one_forward(window, attn, monkeypatch):
    """Feeding a sequence in uneven chunks (single tokens included) through the KV cache gives
    the full forward's logits, whichever backend attends (the full forward uses sdpa)."""
    from agentc.model.kv_cache import CacheFull, KVCache
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=50, sliding_window=window)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 50, (1, 40))
    cache = KVCache(cfg, 40)
    with torch.no_grad():
        full = model(x)
        model.cfg.attention = attn
        parts = [model.head(model.hidden(x[:, s:e], cache=cache))
                 for s, e in [(0, 7), (7, 8), (8, 9), (9, 30), (30, 31), (31, 40)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(CacheFull):
        model.hidden(x[:, :1], cache=cache)
