"""Checkpoint I/O: our own format, and Hugging Face import/export for Llama, Mistral and Qwen2.

Two on-disk formats, both a directory with a config.json and safetensors weights:

1. agentc (what train.py writes and infer.py reads):
       model.safetensors   our state_dict keys, e.g. tok_emb.weight, layers.0.attn.wq.weight,
                           layers.0.mlp.w_gate.weight, norm.weight, lm_head.weight (absent when the
                           LM head is tied to the embedding)
       config.json         {"format": "agentc", "model": ModelConfig.to_dict() without the backends}

2. Hugging Face `transformers` (what the Hub serves, what vLLM / llama.cpp converters read):
       config.json         model_type llama | mistral | qwen2, hidden_size, rope_parameters, ...
       model.safetensors   or model-00001-of-0000N.safetensors ... + model.safetensors.index.json
                           (its weight_map says which shard holds which tensor)
   Keys are renamed (model.layers.{i}.self_attn.q_proj.weight <-> layers.{i}.attn.wq.weight, see
   hf_key_map). No tensor is permuted: HF stores q/k projections in the "rotate half" layout that
   our apply_rope uses (the permutation happens once, in HF's convert_llama_weights_to_hf.py).

Both config styles of `transformers` are read: v4 (top-level `rope_theta`, `rope_scaling` with
`type` or `rope_type`) and v5 (`rope_parameters` holding rope_theta, rope_type, factor, ...). On
export both are written, so either generation of readers finds what it looks for.

Every file is written atomically (a temp file in the same directory, fsync, os.replace) and the
config last, so a directory whose config.json exists holds complete weights even after a crash.

    model = load_any("runs/x/ckpt")                        # either format, by its config.json
    model = import_hf("Llama-3.2-1B", dtype=torch.bfloat16)
    export_hf(model, "out/hf", arch="llama")
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from agentc.model.transformer import ModelConfig, Transformer
from agentc.util import atomic_write, read_json, write_json

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# ----------------------------------------------------------------------------- small helpers


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    # "format": "pt" is the metadata transformers' loader expects to find in every file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory}; is this a checkpoint directory?")
    return read_json(path)


@contextlib.contextmanager
def _open_safetensors(path: str):
    """safe_open(path), with a damaged file's error naming the file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: truncated or not a safetensors file ({e})") from None


def sha256(path: str) -> str:
    """The SHA-256 of a file, read in 16 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def damage(directory: str, files: dict[str, str], optional=lambda name: False) -> str | None:
    """What is wrong with `directory` against the digests `files` recorded when it was written
    (None: nothing). Files `optional` accepts may be absent (another node's optimizer shard)."""
    for name, want in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            if optional(name):
                continue
            return f"{name} is missing"
        if sha256(path) != want:
            return f"{name} does not match its checksum (a torn or corrupted write)"
    return None


def unwrap(model: nn.Module) -> Transformer:
    """The Transformer inside DDP (.module) or torch.compile (._orig_mod) wrappers, whose state_dict
    keys carry prefixes; wrappers never change our checkpoint keys."""
    while not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", getattr(model, "module", None))
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a Transformer (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def _tensors_to_write(model: nn.Module, dtype: torch.dtype | None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our state_dict (or the whole one given, e.g. gathered from FSDP shards) as CPU tensors
    safetensors accepts: contiguous, optionally cast, and no two keys sharing storage (safetensors
    refuses that; a tied model has no lm_head key, but a user's module might still share a tensor,
    so copy any repeat)."""
    out, seen = {}, set()
    for name, t in (unwrap(model).state_dict() if state_dict is None else state_dict).items():
        t = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def describe(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def build(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> Transformer:
    """A Transformer holding exactly these tensors. Built on the meta device (no memory, no random
    init) and then given the tensors with assign=True, so a 7B model is never initialised just
    to be overwritten. The tensors must already be on the target device and dtype."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config. missing: [{describe(missing)}]; "
                         f"unexpected: [{describe(unexpected)}]")
    wrong = [f"{k} {tuple(state_dict[k].shape)} (config says {tuple(s)})"
             for k, s in expected.items() if state_dict[k].shape != s]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the config: {describe(wrong)}")
    model.load_state_dict(state_dict, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer added to the model later would need building here
        raise RuntimeError(f"{source}: still on the meta device after loading: {describe(left)}")
    return model


def _cast(t: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype)


# ----------------------------------------------------------------------------- our format


def save(model: nn.Module, directory: str, dtype: torch.dtype | None = None,
         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write model.safetensors and config.json (in that order, see the module docstring) into
    `directory`, creating it. dtype: cast the weights on the way out (e.g. torch.bfloat16).
    state_dict: the whole tensors to write instead of the model's own (an FSDP model holds shards)."""
    model = unwrap(model)
    os.makedirs(directory, exist_ok=True)
    _write_safetensors(os.path.join(directory, "model.safetensors"), _tensors_to_write(model, dtype, state_dict))
    # the attention and loss backends are how a run computes, the loader's choice (ModelConfig)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in ("attention", "loss")}
    write_json(os.path.join(directory, "config.json"), {"format": "agentc", "model": cfg})


def load(directory: str, device="cpu", dtype: torch.dtype | None = torch.float32) -> Transformer:
    """The model saved by `save`, on `device` in `dtype` (None: as stored)."""
    meta = _read_config(directory)
    if meta.get("format") != "agentc":
        raise ValueError(f"{directory}/config.json is not an agentc checkpoint (format={meta.get('format')!r})")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory}/config.json: not a model config ({type(e).__name__}: {e})") from None
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    with _open_safetensors(path) as f:
        sd = {k: _cast(f.get_tensor(k), device, dtype) for k in f.keys()}
    return build(cfg, sd, path)


def load_any(path: str, device="cpu", dtype: torch.dtype | None = torch.float32) -> Transformer:
    """Load either format, told apart by config.json: "format": "agentc" or a HF "model_type"."""
    meta = _read_config(path)
    if meta.get("format") == "agentc":
        return load(path, device, dtype)
    if "model_type" in meta:
        return import_hf(path, device, dtype)
    raise ValueError(f"{path}/config.json is neither an agentc checkpoint (no \"format\": \"agentc\") "
                     "nor a Hugging Face one (no \"model_type\")")


# ----------------------------------------------------------------------------- Hugging Face names


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state_dict key -> Hugging Face key, for every tensor a model with this config holds."""
    m = {"tok_emb.weight": "model.embed_tokens.weight"}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        m[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[f"{ours}attn.{a}.weight"] = f"{hf}self_attn.{b}.weight"
            if cfg.qkv_bias and a != "wo":  # Qwen2: biases on q, k, v only
                m[f"{ours}attn.{a}.bias"] = f"{hf}self_attn.{b}.bias"
        m[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            m[f"{ours}mlp.{a}.weight"] = f"{hf}mlp.{b}.weight"
    m["norm.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


# ----------------------------------------------------------------------------- Hugging Face import


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either config style (see the module docstring)."""
    # v5 itself lets a legacy rope_scaling win over rope_parameters; rope_theta may sit in either
    # dict or at the top level (v4)
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):  # v5 nests per layer type (Gemma-style)
        raise ValueError(f"rope_parameters per layer type are not supported: {params}")
    theta = float(params.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
                  or hf.get("rope_theta") or 10000.0)
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (rotating part of each head) is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        # v5 fills original_max_position_embeddings from max_position_embeddings when absent
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        return theta, {"type": "llama3", "factor": float(params["factor"]),
                       "low_freq_factor": float(params["low_freq_factor"]),
                       "high_freq_factor": float(params["high_freq_factor"]),
                       "original_max_seq_len": int(original)}
    raise ValueError(f"rope_type {kind!r} (config key rope_parameters/rope_scaling) is not supported; "
                     "this model knows default, linear and llama3")


def _qwen2_sliding_window(hf: dict) -> int | None:
    """Qwen2 slides only where use_sliding_window is true, and then only on layers >= max_window_layers
    (or those layer_types marks "sliding_attention"). We have one window for every layer, so a mix
    is refused."""
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return int(hf["sliding_window"])
    raise ValueError("use_sliding_window=true with a sliding window on some layers only (max_window_layers / "
                     "layer_types) is not supported: this model has one window for all layers")


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json dict (llama, mistral, qwen2); anything we
    would compute differently is refused with the key that says so."""
    arch = hf.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"model_type {arch!r} is not supported; choose from {', '.join(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; this model's MLP is SwiGLU (silu)")
    if hf.get("attention_bias", False):  # Llama's flag puts a bias on o_proj too, which we lack
        raise ValueError("attention_bias=true is not supported (this model has no bias on the output projection)")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported (this model's MLP has no biases)")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    if arch == "mistral":
        window = hf.get("sliding_window")
    elif arch == "qwen2":
        window = _qwen2_sliding_window(hf)
    else:
        window = None
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or 0,
        ffn_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False is the default of all three
        qkv_bias=arch == "qwen2", sliding_window=window,
        init_std=float(hf.get("initializer_range", 0.02)))


def _hf_weight_files(directory: str) -> list[str]:
    """The safetensors files of a HF checkpoint: the shards the index names, else model.safetensors,
    else every *.safetensors (Mistral's consolidated.safetensors, a duplicate of the weights under
    Mistral's own names, is skipped)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object")
        files = sorted(set(weight_map.values()))
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(p for p in glob.glob(os.path.join(directory, "*.safetensors"))
                   if not os.path.basename(p).startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    return files


def import_hf(directory: str, device="cpu", dtype: torch.dtype | None = torch.float32) -> Transformer:
    """A Hugging Face Llama / Mistral / Qwen2 checkpoint directory as our Transformer."""
    cfg = config_from_hf(_read_config(directory))
    ours = {hf: o for o, hf in hf_key_map(cfg).items()}  # HF key -> our key
    where = {}                                            # HF key -> file
    for path in _hf_weight_files(directory):
        with _open_safetensors(path) as f:
            for k in f.keys():
                if k in where:
                    raise ValueError(f"tensor {k} is in both {where[k]} and {path}")
                where[k] = path

    # Ignorable extras: old checkpoints saved RoPE's inv_freq as a buffer, and some tied checkpoints
    # still carry a copy of the embedding as lm_head.weight.
    def ignored(k):
        return k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight")
    missing = set(ours) - set(where)
    unexpected = {k for k in where if k not in ours and not ignored(k)}
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json. missing: [{describe(missing)}]; "
                         f"unexpected: [{describe(unexpected)}]")
    sd = {}
    for path in sorted(set(where.values())):  # one file open at a time; tensors cast as they come
        with _open_safetensors(path) as f:
            for k in f.keys():
                if k in ours:
                    sd[ours[k]] = _cast(f.get_tensor(k), device, dtype)
    return build(cfg, sd, directory)


# ----------------------------------------------------------------------------- Hugging Face export


def config_to_hf(cfg: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """A config.json that transformers v5 (rope_parameters, dtype) and v4 (rope_theta, rope_scaling,
    torch_dtype) both load as `arch`. Refuses what the target architecture cannot express."""
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not supported; choose from {', '.join(HF_ARCHITECTURES)}")
    if arch in ("llama", "mistral") and cfg.qkv_bias:
        raise ValueError(f"{arch} has no q/k/v biases but this model has qkv_bias=True; export as qwen2")
    if arch == "qwen2" and not cfg.qkv_bias:
        raise ValueError("qwen2 always has q/k/v biases but this model has qkv_bias=False; export as llama")
    if arch == "llama" and cfg.sliding_window is not None:
        raise ValueError(f"llama has no sliding window but this model has sliding_window={cfg.sliding_window}; "
                         "export as mistral")
    s = cfg.rope_scaling
    if s is None:
        scaling = None
    elif s["type"] == "linear":
        scaling = {"rope_type": "linear", "factor": s["factor"]}
    else:
        scaling = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                   "high_freq_factor": s["high_freq_factor"],
                   "original_max_position_embeddings": s["original_max_seq_len"]}
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {
        "architectures": [HF_ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})},  # v5
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,                                          # v4
        "dtype": dtype_name, "torch_dtype": dtype_name,                                                 # v5, v4
        "attention_dropout": 0.0, "use_cache": True,
        # the token ids belong to the tokenizer shipped next to the weights, which we do not see here;
        # null beats the class defaults (1, 2), which would be silently wrong
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: a window, when there is one, on every layer (max_window_layers=0)
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers,
                  layer_types=["sliding_attention" if cfg.sliding_window is not None else "full_attention"]
                  * cfg.n_layers)
    return hf


def export_hf(model: nn.Module, directory: str, arch: str = "llama", dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face checkpoint that AutoModelForCausalLM.from_pretrained loads:
    config.json plus model.safetensors, or shards + index when the weights exceed max_shard_bytes."""
    model = unwrap(model)
    names = hf_key_map(model.cfg)
    tensors = {names[k]: t for k, t in _tensors_to_write(model, dtype).items()}
    out_dtype = next(iter(tensors.values())).dtype
    hf_config = config_to_hf(model.cfg, arch, out_dtype)  # refuses before anything is written
    os.makedirs(directory, exist_ok=True)

    # greedy sharding in key order (layers stay together); a tensor bigger than a shard gets its own
    shards, size = [{}], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        written = {"model.safetensors"}
        _write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    else:
        n, weight_map = len(shards), {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _write_safetensors(os.path.join(directory, name), shard)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(directory, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = {*weight_map.values(), "model.safetensors.index.json"}
    # weights of an earlier export into this directory would be read instead of ours (a stale index
    # wins over model.safetensors), so remove them
    for stale in glob.glob(os.path.join(directory, "model*.safetensors*")):
        if os.path.basename(stale) not in written:
            os.remove(stale)
    write_json(os.path.join(directory, "config.json"), hf_config)


# ----------------------------------------------------------------------------- vocabulary


@torch.no_grad()
def resize_vocab(model: Transformer, vocab_size: int) -> Transformer:
    """Grow the embedding (and an untied LM head) to vocab_size rows, in place. New rows are the
    mean of the old ones, so new special tokens start with average logits instead of the extreme
    ones random rows can give (Hewitt, "Initializing new word embeddings", 2021). Parameters are
    replaced: build the optimizer after this. Shrinking is refused (it would drop trained tokens)."""
    model = unwrap(model)
    old = model.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size} (it would drop trained rows)")
    if vocab_size == old:
        return model

    def grown(w: torch.Tensor) -> nn.Parameter:  # (old, dim) -> (vocab_size, dim)
        mean = w.float().mean(0, keepdim=True).to(w.dtype)
        return nn.Parameter(torch.cat([w, mean.expand(vocab_size - old, -1)]), requires_grad=w.requires_grad)

    model.tok_emb.weight = grown(model.tok_emb.weight)
    model.tok_emb.num_embeddings = vocab_size
    if model.lm_head is not None:  # tied: output_weight is tok_emb.weight, already grown
        model.lm_head.weight = grown(model.lm_head.weight)
        model.lm_head.out_features = vocab_size
    model.cfg = dataclasses.replace(model.cfg, vocab_size=vocab_size)  # a new config: it may be shared
    return model
