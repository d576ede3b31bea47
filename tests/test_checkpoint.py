"""model/checkpoint.py: our format round trip, and parity with Hugging Face `transformers` Llama,
Mistral and Qwen2 on tiny random models, through import and export."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agentc.model import checkpoint as ck
from agentc.model.transformer import ModelConfig, Transformer

try:  # the parity tests need `transformers`; our own format and the error paths do not
    import transformers
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers")

ATOL = 1e-4  # float32 logits of O(1..10); observed differences are ~1e-6
LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (model_type, config overrides): each case exercises something the others do not
CASES = {
    "llama-llama3-untied": ("llama", dict(rope_parameters=LLAMA3, max_position_embeddings=64)),
    "llama-linear-tied": ("llama", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear",
                                                                                   "factor": 2.0, "rope_theta": 500.0})),
    "mistral-window7": ("mistral", dict(sliding_window=7, head_dim=8)),  # head_dim != hidden / heads
    "qwen2-biases": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-window5": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
}


def hf_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random HF model. Every parameter is redrawn (norms around 1, biases non-zero, weights
    big enough for O(1) logits): default inits (unit norms, zero biases) would hide mapping bugs."""
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    config_cls, model_cls = getattr(transformers, names + "Config"), getattr(transformers, names + "ForCausalLM")
    cfg = config_cls(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
                     attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def our_logits(model, tokens, doc_offsets=None):
    with torch.no_grad():
        return model(tokens, doc_offsets)


def max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def tokens(B=2, T=37, seed=1):
    return torch.randint(0, 211, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    """(HF model, its save_pretrained directory) for every case."""
    model_type, overrides = CASES[request.param]
    model = hf_model(model_type, **overrides)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return model, str(d)


def ours_random(seed=0, **cfg) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**dict(vocab_size=211, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                              ffn_dim=96), **cfg})).eval()
    with torch.no_grad():  # norms != 1 and non-zero biases, as above
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    return model


# ----------------------------------------------------------------------------- import


@needs_hf
def test_import_matches_hf(hf_case):
    hf, d = hf_case
    ours = ck.import_hf(d)
    x = tokens()
    assert max_diff(our_logits(ours, x), hf_logits(hf, x)) < ATOL
    assert all(p.dtype == torch.float32 and not p.is_meta for p in ours.parameters())
    assert (ours.lm_head is None) == hf.config.tie_word_embeddings


@needs_hf
def test_import_packed_documents(hf_case):
    """Two documents packed in one row compute what each computes alone through HF."""
    hf, d = hf_case
    ours = ck.import_hf(d)
    a, b = tokens(1, 20, seed=2), tokens(1, 17, seed=3)
    packed = our_logits(ours, torch.cat([a, b], 1), torch.tensor([0, 20, 37], dtype=torch.int32))
    assert max_diff(packed, torch.cat([hf_logits(hf, a), hf_logits(hf, b)], 1)) < ATOL


@needs_hf
def test_import_sharded(tmp_path):
    hf = hf_model("llama", rope_parameters=LLAMA3, max_position_embeddings=64)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    x = tokens()
    assert max_diff(our_logits(ck.import_hf(str(tmp_path)), x), hf_logits(hf, x)) < ATOL
    os.remove(tmp_path / "model.safetensors.index.json")  # no index: every *.safetensors is read
    assert max_diff(our_logits(ck.load_any(str(tmp_path)), x), hf_logits(hf, x)) < ATOL


def test_config_from_hf_v4_style():
    """transformers v4 configs: rope_theta at the top, rope_scaling with `type` or `rope_type`."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=500000)
    cfg = ck.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 4}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.n_kv_heads) == (500000.0, {"type": "linear", "factor": 4.0}, 4)
    cfg = ck.config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0}})
    assert cfg.rope_scaling["original_max_seq_len"] == 128 and cfg.rope_theta == 500000.0
    assert ck.config_from_hf({**base, "rope_scaling": None}).rope_scaling is None


# ----------------------------------------------------------------------------- export


@needs_hf
def test_export_matches_hf(hf_case, tmp_path):
    """HF -> ours -> HF: AutoModelForCausalLM loads our export and computes the original logits."""
    hf, d = hf_case
    ck.export_hf(ck.import_hf(d), str(tmp_path), arch=hf.config.model_type)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(back) is type(hf)
    assert back.config.rope_parameters == hf.config.rope_parameters
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    x = tokens()
    assert max_diff(hf_logits(back, x), hf_logits(hf, x)) < ATOL


@needs_hf
@pytest.mark.parametrize("arch,cfg", [("llama", {}), ("mistral", dict(sliding_window=6)),
                                      ("qwen2", dict(qkv_bias=True, tie_embeddings=True))])
def test_export_sharded(arch, cfg, tmp_path):
    ours = ours_random(rope_scaling={"type": "linear", "factor": 3.0}, **cfg)
    ck.export_hf(ours, str(tmp_path), arch=arch, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    x = tokens()
    assert max_diff(hf_logits(back, x), our_logits(ours, x)) < ATOL
    again = ck.import_hf(str(tmp_path))
    assert again.cfg == ours.cfg
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    # a later unsharded export into the same directory must not leave the old index to win
    ck.export_hf(ours, str(tmp_path), arch=arch)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("model")) == ["model.safetensors"]
    assert max_diff(our_logits(ck.import_hf(str(tmp_path)), x), our_logits(ours, x)) == 0


@needs_hf
def test_export_bf16_config(tmp_path):
    ck.export_hf(ours_random(), str(tmp_path), dtype=torch.bfloat16)
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert config.dtype == torch.bfloat16
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("arch,cfg,match", [
    ("llama", dict(qkv_bias=True), "qkv_bias"), ("mistral", dict(qkv_bias=True), "qkv_bias"),
    ("qwen2", {}, "qkv_bias"), ("llama", dict(sliding_window=8), "sliding_window"), ("gpt2", {}, "arch")])
def test_export_refuses(arch, cfg, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ck.export_hf(ours_random(**cfg), str(tmp_path / "out"), arch=arch)
    assert not (tmp_path / "out").exists()  # refused before writing anything


# ----------------------------------------------------------------------------- our format


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip(tied, tmp_path):
    ours = ours_random(tie_embeddings=tied, qkv_bias=True, sliding_window=9)
    ck.save(ours, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "agentc"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    loaded = ck.load_any(str(tmp_path))
    assert loaded.cfg == ours.cfg
    sd = loaded.state_dict()
    assert sd.keys() == ours.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
    x = tokens()
    assert torch.equal(our_logits(loaded, x), our_logits(ours, x))
    if tied:
        assert loaded.lm_head is None
        assert loaded.output_weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    assert all(p.requires_grad for p in loaded.parameters())


def test_load_dtype(tmp_path):
    ours = ours_random()
    ck.save(ours, str(tmp_path / "a"))
    assert all(p.dtype == torch.bfloat16 for p in ck.load(str(tmp_path / "a"), dtype=torch.bfloat16).parameters())
    ck.save(ours, str(tmp_path / "b"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ck.load(str(tmp_path / "b"), dtype=None).parameters())
    back = ck.load(str(tmp_path / "b"))  # float32 by default
    assert all(torch.equal(back.state_dict()[k], v.bfloat16().float()) for k, v in ours.state_dict().items())


# ----------------------------------------------------------------------------- resize_vocab


@pytest.mark.parametrize("tied", [False, True])
def test_resize_vocab(tied, tmp_path):
    ours = ours_random(tie_embeddings=tied)
    x = tokens()
    before, old_emb = our_logits(ours, x), ours.tok_emb.weight.clone()
    assert ck.resize_vocab(ours, 215) is ours
    assert ours.cfg.vocab_size == 215 and ours.tok_emb.weight.shape == (215, 64)
    assert ours.output_weight.shape == (215, 64)
    assert (ours.lm_head is None) == tied
    after = our_logits(ours, x)
    assert torch.allclose(after[..., :211], before, atol=1e-6, rtol=0)
    assert torch.allclose(ours.tok_emb.weight[211:], old_emb.mean(0).expand(4, -1), atol=1e-6)
    ck.save(ours, str(tmp_path))  # the grown config travels with the weights
    assert ck.load(str(tmp_path)).cfg.vocab_size == 215
    with pytest.raises(ValueError, match="shrink"):
        ck.resize_vocab(ours, 100)


# ----------------------------------------------------------------------------- errors


def _hf_dict(**changes):
    d = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=128)
    return {**d, **changes}


@pytest.mark.parametrize("changes,match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="gemma"), "model_type"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1,
          num_hidden_layers=2), "use_sliding_window"),
])
def test_config_from_hf_refuses(changes, match):
    with pytest.raises(ValueError, match=match):
        ck.config_from_hf(_hf_dict(**changes))


@needs_hf
def test_import_missing_tensor(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"missing: \[model.layers.1.mlp.down_proj.weight\]; "
                                         r"unexpected: \[model.extra.weight\]"):
        ck.import_hf(str(tmp_path))


def test_load_shape_mismatch(tmp_path):
    ck.save(ours_random(), str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["ffn_dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shapes do not match.*w_gate"):
        ck.load(str(tmp_path))


def test_load_any_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.load_any(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ck.load_any(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        ck.load_any(str(tmp_path))
