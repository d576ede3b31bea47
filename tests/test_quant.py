"""model/quant.py: weight-only quantization for inference. Tiny random models, odd shapes.

Bounds. An int8 weight is off by at most half its channel's step (scale = max|w| / 127), and the CPU
kernel rounds activations to bfloat16 (relative error 2^-9); one Int8Linear is therefore within
    |y - x @ w.T| <= sum_k |x_k| (scale_n / 2 + 2^-8 |w_nk|) + 2^-8 |y_n|
of the float product (checked elementwise below). Through a whole model the errors compound;
the tests bound the logits by a fraction of their own largest magnitude: 3% for int8 and bf16
(these random tiny models measure 0.8-1.7% for int8 and 0.5-1.4% for bf16 over three seeds).
"""
import pytest
import torch

from agentc.model import checkpoint, quant
from agentc.model.kv_cache import KVCache
from agentc.model.quant import Int8Linear, int8_weight, quantize
from agentc.model.transformer import ModelConfig, Transformer

# dim 72 (head_dim 18), ffn 100, vocab 101: no power of two anywhere
ODD = dict(vocab_size=101, dim=72, n_heads=4, n_kv_heads=2, ffn_dim=100)


def model(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny", **{**ODD, **kw})).eval()
    with torch.no_grad():  # norms and biases off their init values, weights 3x init_std
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3)
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# x is (2, M, K): 2M rows. int8pack: 2, 6, 16 rows; widened to bf16: 32, 66; float32 fallback: K = 29, 100
@pytest.mark.parametrize("N,K,M", [(37, 48, 1), (37, 48, 3), (200, 64, 8), (200, 64, 16), (40, 64, 33),
                                   (5, 29, 2), (96, 100, 40)])
def test_int8_linear_within_its_bound(N, K, M):
    """Every way Int8Linear computes stays within the bound in the docstring: the int8pack kernel
    (K a multiple of 16, fewer than DEQUANT_MIN_ROWS rows), bf16 weights widened from int8 (as
    many rows or more), and the float32 fallback (K = 29, 100)."""
    assert quant.DEQUANT_MIN_ROWS == 32  # the shapes above were picked for this threshold
    torch.manual_seed(N + K + M)
    w, b, x = torch.randn(N, K) * 0.05, torch.randn(N), torch.randn(2, M, K)
    lin = Int8Linear(w, b)
    y = lin(x)
    assert y.shape == (2, M, N) and y.dtype == torch.float32
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    _, scale = int8_weight(w)
    bound = x.double().abs() @ (scale.double()[:, None] / 2 + 2 ** -8 * w.double().abs()).T + 2 ** -8 * ref.abs()
    assert ((y.double() - ref).abs() <= bound + 1e-6).all()


def test_int8_weight_rounds_to_nearest_step():
    w = torch.randn(7, 33)
    q, scale = int8_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(scale, scale.bfloat16().float())  # the bf16 kernel sees exactly this scale
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] * 0.502 + 1e-7).all()


@pytest.mark.parametrize("kw", [{"tie_embeddings": True}, {"tie_embeddings": False, "qkv_bias": True}])
@pytest.mark.parametrize("kind,tol", [("int8", 0.03), ("bf16", 0.03), ("fp32", 1e-6)])
def test_logits_close_to_float(kw, kind, tol):
    x = torch.randint(0, ODD["vocab_size"], (2, 13))
    with torch.no_grad():
        ref = model(**kw)(x)
        out = quantize(model(**kw), kind)(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tol


def test_int8_model_holds_int8_linears_and_head():
    m = quantize(model(tie_embeddings=True), "int8")
    for block in m.layers:
        for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo,
                    block.mlp.w_gate, block.mlp.w_up, block.mlp.w_down):
            assert isinstance(lin, Int8Linear) and lin.weight.dtype == torch.int8
    assert isinstance(m.fast_head, Int8Linear)
    assert m.tok_emb.weight.dtype == torch.float32  # the embedding lookup stays float
    assert not any(p.dtype == torch.bfloat16 for p in m.parameters())


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_cached_decode_matches_full_forward(kind):
    """Prefill then token-by-token decode through the KV cache and head() give the logits of one
    forward of the whole sequence (the same quantized model both ways)."""
    m = quantize(model(tie_embeddings=True), kind)
    x = torch.randint(0, ODD["vocab_size"], (1, 11))
    with torch.no_grad():
        full = m(x)[0]
        cache = KVCache(m.cfg, 16, 1, dtype=next(m.parameters()).dtype)
        steps = [m.head(m.hidden(x[:, :6], cache=cache))[0]]
        for t in range(6, 11):
            steps.append(m.head(m.hidden(x[:, t:t + 1], cache=cache))[0])
    assert rel_err(torch.cat(steps), full) < (1e-5 if kind == "int8" else 0.02)


def test_unknown_kind_and_double_quantization_refused():
    with pytest.raises(ValueError, match="unknown quantization kind 'int4'.*fp32, bf16, int8"):
        quantize(model(), "int4")
    m = quantize(model(), "int8")
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize(m, "fp32")


def test_int8_model_refuses_to_save_and_bf16_keeps_its_keys(tmp_path):
    keys = set(model().state_dict())
    m = quantize(model(), "int8")
    with pytest.raises(RuntimeError, match="int8-quantized for inference"):
        m.state_dict()
    with pytest.raises(RuntimeError, match="int8-quantized for inference"):
        checkpoint.save(m, str(tmp_path / "int8"))
    b = quantize(model(), "bf16")
    assert set(b.state_dict()) == keys and all(t.dtype == torch.bfloat16 for t in b.state_dict().values())
    checkpoint.save(b, str(tmp_path / "bf16"))
    assert set(checkpoint.load(str(tmp_path / "bf16")).state_dict()) == keys
