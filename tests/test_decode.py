"""Compiled decode steps (agentc/model/decode.py) against the model's own forward through the KV
cache: the same logits within the dtype's tolerance, the same cache contents, for several rows at
different offsets, padding rows, T > 1 (draft verification), GQA, q/k/v biases and a sliding window."""
import pytest
import torch

from agentc.model import decode
from agentc.model.decode import DecodeGraphs, bucket, choose_kind
from agentc.model.kv_cache import KVCache
from agentc.model.quant import quantize
from agentc.model.transformer import ModelConfig, Transformer

ODD = {"vocab_size": 97, "dim": 48, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2, "ffn_dim": 80}


def model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**ODD, **kw})).eval()


def eager_vs_graphs(m, steps, compile=False, rows=3, max_len=24):
    """Prefill rows 0..rows-1 with prompts of different lengths, then run `steps` ((row list, T)
    each) through the eager forward on one cache and DecodeGraphs on another; the largest logit
    difference relative to the logits' spread, and the two caches."""
    dtype = next(m.parameters()).dtype
    ca, cb = KVCache(m.cfg, max_len, rows, dtype=dtype), KVCache(m.cfg, max_len, rows, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for r in range(rows):
            x = torch.randint(0, m.cfg.vocab_size, (1, 3 + 2 * r), generator=g)
            for c in (ca, cb):
                c.bind([r])
                m.hidden(x, cache=c)
        graphs = DecodeGraphs(m, cb, compile=compile)
        worst = 0.0
        for rs, T in steps:
            x = torch.randint(0, m.cfg.vocab_size, (len(rs), T), generator=g)
            ca.bind(rs)
            want = m.head(m.hidden(x, cache=ca)).float()
            got = graphs(x, rs)
            worst = max(worst, ((got - want).abs().max() / want.std()).item())
    return worst, ca, cb


STEPS = [([0], 1), ([2, 0], 1), ([0, 1, 2], 1), ([1], 3), ([2, 1], 2), ([1], 1)]


def same_cache(ca, cb, tol):
    assert ca.lengths == cb.lengths
    for r, n in enumerate(ca.lengths):
        assert torch.allclose(ca.k[:, r, :, :n].float(), cb.k[:, r, :, :n].float(), atol=tol, rtol=tol)
        assert torch.allclose(ca.v[:, r, :, :n].float(), cb.v[:, r, :, :n].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "tie_embeddings": True}, {"sliding_window": 4}])
def test_graph_functions_match_the_eager_forward_float32(kw):
    m = model(**kw)
    worst, ca, cb = eager_vs_graphs(m, STEPS)
    assert worst < 1e-5
    same_cache(ca, cb, 1e-6)


@pytest.mark.parametrize("kind,tol", [("bf16", 0.05), ("int8", 0.02)])
def test_graph_functions_match_the_eager_forward_quantized(kind, tol):
    """bf16 runs in bfloat16 both ways; int8's eager kernel rounds activations to bfloat16 where
    the graph keeps float32, so the two agree to int8's rounding, not float32's."""
    m = quantize(model(dim=64, n_heads=4, n_kv_heads=2, tie_embeddings=True), kind)
    worst, _, _ = eager_vs_graphs(m, STEPS)
    assert worst < tol


def test_int8_bf16_copies_compute_the_int8_model():
    """The bfloat16 copies of int8 weights are exact: a step with them matches the int8 reduction."""
    m = quantize(model(dim=64, n_heads=4, n_kv_heads=2), "int8")
    outs = {}
    for kind in ("int8", "int8-bf16"):
        c = KVCache(m.cfg, 8, 2)
        x = torch.tensor([[5, 6], [7, 8]])
        outs[kind] = DecodeGraphs(m, c, compile=False)(x, [0, 1], kind=kind)
    assert ((outs["int8"] - outs["int8-bf16"]).abs().max() / outs["int8"].std()) < 0.02


def test_compiled_steps_match_eager_and_pad_rows():
    """torch.compile of the same functions: one graph per (rows, T), any attended length; three rows
    of a four-row bucket leave the padding row's real cache untouched."""
    m = model()
    worst, ca, cb = eager_vs_graphs(m, STEPS + [([0], 1)] * 3, compile=True)
    assert worst < 1e-5
    same_cache(ca, cb, 1e-5)


def test_bucket_sizes():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(3, 3) == 3 and bucket(5, 6) == 6


def test_choose_kind_measures_once_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTC_CACHE", str(tmp_path))
    m = quantize(model(dim=64, n_heads=4, n_kv_heads=2), "int8")
    c = KVCache(m.cfg, 16, 2)
    full = KVCache(m.cfg, 8, 2)
    full.lengths = [3, 8]
    assert choose_kind(DecodeGraphs(m, full, compile=False), 2, 1, repeats=1) == "int8"  # no room: not measured
    assert not (tmp_path / "decode_kinds.json").exists()
    c.lengths = [3, 5]
    c.k.normal_()
    before = c.k.clone()
    g = DecodeGraphs(m, c, compile=False)
    k = choose_kind(g, 2, 1, repeats=1)
    assert k in ("int8", "int8-bf16") and g.kinds[(2, 1)] == k and c.lengths == [3, 5]
    assert torch.equal(c.k[:, 0, :, :3], before[:, 0, :, :3]) and torch.equal(c.k[:, 1, :, :5], before[:, 1, :, :5])
    saved = (tmp_path / "decode_kinds.json").read_text()
    assert k in saved
    calls = []
    monkeypatch.setattr(DecodeGraphs, "__call__", lambda *a, **kw: calls.append(a))
    assert choose_kind(DecodeGraphs(m, c, compile=False), 2, 1) == k and not calls  # read, not timed
    assert choose_kind(DecodeGraphs(model(), c, compile=False), 2, 1) == "float"
    assert decode.kinds_file().startswith(str(tmp_path))
