"""The agentc transformer: a decoder-only model with the Llama / Mistral / Qwen2 architecture.

Read top to bottom: config and presets, RMSNorm, rotary embeddings, the attention dispatch point,
Attention -> MLP -> Block -> Transformer, then the loss dispatch point and FLOP accounting.

Packed training rows hold several documents (trajectories). `doc_offsets` gives their
boundaries over the flattened (B*T) tokens, FlashAttention's "cu_seqlens" convention; a document
never attends to another one and its positions restart at 0, so a packed row computes exactly
what each trajectory would compute alone (tests/test_model.py checks this).

Module names are the checkpoint keys (agentc/model/checkpoint.py maps them to Hugging Face
names). Fast kernels plug in at `attend` (ModelConfig.attention, train.py --attn) and `lm_loss`
(ModelConfig.loss, --loss); they never change a key.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from agentc.data import documents

# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512                 # residual stream width
    n_layers: int = 8
    n_heads: int = 8               # query heads
    n_kv_heads: int = 8            # key/value heads: n_heads / n_kv_heads queries share one (GQA)
    head_dim: int = 0              # 0: dim // n_heads
    ffn_dim: int = 0               # SwiGLU hidden width; 0: 8/3 * dim rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_seq_len"} (Llama 3.1's long-context rule)
    rope_scaling: dict | None = None
    max_seq_len: int = 4096        # longest sequence the model is meant for (informative: RoPE has no table)
    tie_embeddings: bool = False   # the LM head reuses the token embedding
    qkv_bias: bool = False         # Qwen2 has biases on q, k and v (not on the output projection)
    sliding_window: int | None = None  # Mistral v0.1: a query sees only its last `sliding_window` keys
    init_std: float = 0.02
    # How the model computes, not what it is: neither changes a weight or a checkpoint key, and
    # checkpoint.save leaves both out of config.json (a GPU run's choice must not follow the weights
    # to a CPU). "auto" decides by the device when the forward runs; the dispatch is below.
    attention: str = "auto"        # auto (triton on CUDA, sdpa on the CPU) | triton | sdpa | flex | reference
    loss: str = "auto"             # auto (fused on CUDA, reference on the CPU) | fused | reference

    def __post_init__(self):
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            needs = {"linear": {"factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_seq_len"}}.get(self.rope_scaling.get("type"))
            if needs is None:
                raise ValueError(f"unsupported rope_scaling {self.rope_scaling}; this model knows linear and llama3")
            if needs - self.rope_scaling.keys():
                raise ValueError(f"rope_scaling {self.rope_scaling} lacks {sorted(needs - self.rope_scaling.keys())}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose from {BACKENDS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {LOSSES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Sizes are parameters without the embeddings (they depend on the tokenizer). The two named shapes
# are the published architectures; training one of them from scratch here is not the point,
# importing their checkpoints (model/checkpoint.py) is.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192),            # 0.1M, tests
    "mini": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384,            # 0.85M, CPU quick start;
                 rope_theta=1e6),  # 7 of 16 rotary pairs turn < 1 radian over 2k tokens: room for --copy-init
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704),          # 3.0M, CPU runs
    "25m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408),           # 23.6M
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072),       # 113M
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,          # 0.97B, Llama-3.2-1B shape
               rope_theta=500000.0, tie_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, max_seq_len=8192),
    "mistral-7b": dict(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       rope_theta=1000000.0, max_seq_len=32768),                       # v0.3
}


# ----------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the activation dtype, then scale (the order Llama uses)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


# ----------------------------------------------------------------------------- rotary embeddings


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) float32 rotation speeds; pair i of a head turns by position * freq[i]."""
    d = cfg.head_dim
    freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = cfg.rope_scaling
    if s is None:
        return freq
    if s["type"] == "linear":  # position interpolation: every pair turns `factor` times slower
        return freq / s["factor"]
    # llama3: pairs whose wavelength is short next to the original context keep their speed, long
    # ones are slowed by `factor`, and the band in between blends the two (Llama 3.1 report, sec. 3).
    ctx = s["original_max_seq_len"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    wavelength = 2 * math.pi / freq
    blend = ((ctx / wavelength - lo) / (hi - lo)).clamp(0.0, 1.0)  # 1: keep, 0: slow down
    return blend * freq + (1 - blend) * freq / s["factor"]


def rope_cos_sin(positions: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, 1, head_dim) in float32, shared by every layer."""
    angles = positions.float()[..., None] * freq        # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # (B, T, 1, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) queries or keys. Pairs are (i, i + D/2), the "rotate half" layout that
    Hugging Face checkpoints store their q/k projections in, so they import without permuting."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ----------------------------------------------------------------------------- documents


@dataclass
class Documents:
    """Where the documents of a (B, T) batch start and end, computed once per forward."""
    offsets: torch.Tensor | None  # (n_docs + 1,) int32 over the flattened B*T tokens; None: one per row
    positions: torch.Tensor       # (B, T) int64, restarting at 0 at every document
    ids: torch.Tensor | None      # (B, T) int64 index of each token's document
    window: int | None            # sliding window (keys a query may see), None for all
    q_offset: int = 0             # with a KV cache of one bound row: position of the first query among its keys
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _spans: list | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)  # per-forward objects the backends build once

    @classmethod
    def from_offsets(cls, doc_offsets: torch.Tensor | None, B: int, T: int, window: int | None,
                     device) -> "Documents":
        if doc_offsets is None:
            pos = torch.arange(T, device=device).expand(B, T)
            return cls(None, pos, None, window)
        off = doc_offsets.to(device=device, dtype=torch.long)
        if off.ndim != 1 or off[0] != 0 or off[-1] != B * T:
            raise ValueError(f"doc_offsets must run from 0 to B*T={B * T}, got {doc_offsets.tolist()}")
        # a document never spans two rows: every row start must be a boundary
        if not torch.isin(torch.arange(0, B * T, T, device=device), off).all():
            raise ValueError("doc_offsets must contain every row start (0, T, 2T, ...)")
        ids = documents.document_ids(off, B, T)
        return cls(doc_offsets, documents.positions(off, B, T, ids), ids, window)

    def spans(self) -> list[tuple[int, int, int]]:
        """(row, start, end) of every document, as Python ints (computed once per forward)."""
        if self._spans is None:
            T = self.positions.shape[1]
            off = self.offsets.tolist()
            self._spans = [(s // T, s % T, s % T + (e - s)) for s, e in zip(off[:-1], off[1:])]
        return self._spans

    def needs_mask(self) -> bool:
        """False when plain causal attention is exact (one document per row, no window, no cache
        offset) or when a single new token may see every cached key."""
        T = self.positions.shape[1]
        if self.ids is not None or self.window is not None:
            return True
        return self.q_offset > 0 and T > 1

    def mask(self) -> torch.Tensor:
        """(B or 1, 1, T, q_offset + T) bool, True where query i may attend key j: same document,
        j <= i, and within the sliding window. Built on first use and shared by every layer."""
        if self._mask is None:
            T = self.positions.shape[1]
            self._mask = documents.attention_mask(T, self.q_offset + T, self.ids, self.window,
                                                  self.positions.device)[:, None]
        return self._mask


# ----------------------------------------------------------------------------- attention dispatch

# Which attention runs: ModelConfig.attention (train.py and infer.py --attn). Every backend computes
# the same function (tests/test_model.py checks loss and gradients agree).
#   triton     agentc/kernels/flash_attention.py: document-masked FlashAttention (CUDA, or the CPU
#              interpreter with TRITON_INTERPRET=1); the default on CUDA
#   sdpa       PyTorch's scaled_dot_product_attention. Packed rows on CPU loop over documents
#              (exact, no work on masked pairs; the default on CPU); elsewhere one call with a
#              dense (B, T, T) document mask, which computes every pair and masks most of them
#   flex       FlexAttention with a document block mask (compiled on CUDA; on CPU eager and
#              forward only, as PyTorch allows)
#   reference  the scores written out and softmaxed in plain PyTorch (float64-capable)
BACKENDS = ("auto", "triton", "sdpa", "flex", "reference")
DOC_LOOP_ON_CPU = True  # False: sdpa's dense-mask path on CPU too (tests check the two agree)
_warned = set()


def resolve_backend(name: str, device, kind: str = "attention") -> str:
    """The implementation `name` stands for on `device` ("auto": triton / fused on CUDA, sdpa /
    reference elsewhere); ValueError for a Triton kernel off CUDA, unless TRITON_INTERPRET=1 runs
    it on the CPU (correct but slow). kind: "attention" (ModelConfig.attention, --attn) or "loss"
    (ModelConfig.loss, --loss)."""
    choices, flag, on_cuda, on_cpu = {"attention": (BACKENDS, "--attn", "triton", "sdpa"),
                                      "loss": (LOSSES, "--loss", "fused", "reference")}[kind]
    if name not in choices:
        raise ValueError(f"unknown {kind} backend {name!r}; choose from {choices}")
    cuda = torch.device(device).type == "cuda"
    resolved = name if name != "auto" else (on_cuda if cuda else on_cpu)
    if resolved in ("triton", "fused") and not cuda:
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{flag}={resolved} needs a CUDA device (or TRITON_INTERPRET=1 on the CPU: "
                             "correct but slow)")
    return resolved


def native_bf16(device) -> bool:
    """Whether --dtype=auto trains `device` under bfloat16 autocast: on CUDA always (the GPUs we
    target, Ampere and later, multiply bfloat16 natively), on a CPU when it has AVX512-BF16 or AMX,
    where oneDNN's bfloat16 products beat float32; without them bfloat16 is emulated and slower."""
    if str(device).startswith("cuda"):
        return True
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # private torch probes
        try:
            if getattr(torch.cpu, name)():
                return True
        except Exception:  # missing in this torch version, or failing: assume no native bf16
            pass
    return False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"WARNING: {message}", flush=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents,
           backend: str = "auto") -> torch.Tensor:
    """q (B, T, H, D), k and v (B, S, KV, D) -> (B, T, H, D); scale 1/sqrt(D). S = T in
    training; with a KV cache S = docs.q_offset + T (the cached keys, then the new ones).
    backend: one of BACKENDS (ModelConfig.attention)."""
    impl = resolve_backend(backend, q.device)
    if impl == "triton":
        if docs.window is None:
            return _attend_triton(q, k, v, docs)
        _warn_once("window", "the Triton kernel has no sliding window; attention falls back to sdpa")
        impl = "sdpa"
    if impl == "flex":
        return _attend_flex(q, k, v, docs)
    if impl == "reference":
        return _attend_reference(q, k, v, docs)
    return _attend_sdpa(q, k, v, docs)


def _attend_triton(q, k, v, docs: Documents) -> torch.Tensor:
    from agentc.kernels.flash_attention import document_bounds, flash_attention  # imports triton: only when used
    if docs.offsets is None:
        return flash_attention(q, k, v)
    if "bounds" not in docs._cache:  # once per forward, shared by every layer
        B, T = docs.positions.shape
        docs._cache["bounds"] = document_bounds(docs.offsets.to(q.device), B, T)
    return flash_attention(q, k, v, bounds=docs._cache["bounds"])


def _attend_sdpa(q, k, v, docs: Documents) -> torch.Tensor:
    if q.is_cuda:
        _warn_once("sdpa", "attention runs in PyTorch SDPA with a dense document mask (O(T^2) per row); "
                   "--attn=triton skips the masked pairs")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if docs.ids is not None and docs.window is None and docs.q_offset == 0 and not q.is_cuda and DOC_LOOP_ON_CPU:
        # split, not slicing: the backward of a split is one concatenation, while every slice's
        # backward writes its gradient into a fresh zero tensor of the whole row
        # float32 even under bfloat16 autocast: no slower than the CPU kernel's bfloat16 path (whose
        # backward is the slow part), and the attention scores keep float32 precision
        dtype = q.dtype
        if dtype in (torch.bfloat16, torch.float16):
            q, k, v = (t.float() for t in (q, k, v))
        lengths = [[] for _ in range(q.shape[0])]
        for b, s, e in docs.spans():
            lengths[b].append(e - s)
        rows = []
        for b, n in enumerate(lengths):
            parts = zip(*(t[b:b + 1].split(n, dim=2) for t in (q, k, v)))
            with torch.autocast("cpu", enabled=False):
                rows.append(torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
                                       for qd, kd, vd in parts], dim=2))
        return torch.cat(rows).transpose(1, 2).to(dtype)
    if not docs.needs_mask():  # causal from position 0, or one new token that sees every key
        out = F.scaled_dot_product_attention(q, k, v, is_causal=docs.q_offset == 0, enable_gqa=True)
    else:
        # SDPA's fused GPU kernels refuse a mask together with fewer kv heads and would fall back
        # to materialising (B, H, T, T) scores; giving every query head its own k/v copy keeps the
        # memory-efficient kernel (which takes a mask) in play.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask())
    return out.transpose(1, 2)


def _attend_reference(q, k, v, docs: Documents) -> torch.Tensor:
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~docs.mask(), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


_flex_compiled = None


def _attend_flex(q, k, v, docs: Documents) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    global _flex_compiled
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if "block_mask" not in docs._cache:  # once per forward, shared by every layer
        ids, off, window = docs.ids, docs.q_offset, docs.window

        def mask_mod(b, h, qi, kj):
            ok = kj <= qi + off
            if ids is not None:
                ok = ok & (ids[b, qi] == ids[b, kj])
            if window is not None:
                ok = ok & (qi + off - kj < window)
            return ok
        docs._cache["block_mask"] = create_block_mask(mask_mod, B, None, T, S, device=q.device)
    fn = flex_attention
    if q.is_cuda:  # eager flex attention is a slow reference; compiled it is the fused kernel
        _flex_compiled = _flex_compiled or torch.compile(flex_attention)
        fn = _flex_compiled
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = fn(q, k, v, block_mask=docs._cache["block_mask"], enable_gqa=True)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- the model


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg      # shared by every layer: cfg.attention picks the backend at each forward
        self.layer = layer  # which slice of a KV cache is this layer's
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, docs: Documents, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attend(q, k, v, docs, self.cfg.attention)        # (B, T, H, D)
        else:  # the cache stores k and v, then attends over each row's cached keys and these T
            out = cache.attend(self.layer, q, k, v, docs, self.cfg.attention)
        return self.wo(out.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, docs: Documents, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, docs, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.fast_head = None  # inference only: a module head() calls instead (model/quant.py's int8 head)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, init_std) weights; the two projections that write into the residual stream
        are scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def output_weight(self) -> torch.Tensor:
        """(vocab, dim) weight of the LM head."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, tokens: torch.Tensor, doc_offsets: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """tokens (B, T) -> final normalised hidden states (B, T, dim). With a KV cache
        (model/kv_cache.py) row i of the tokens continues the cache row bound as its i-th (each at
        its own offset) and is appended to it."""
        B, T = tokens.shape
        if cache is not None:
            if doc_offsets is not None:
                raise ValueError("a KV cache holds one document per row; doc_offsets are for training")
            if B != len(cache.rows):
                raise ValueError(f"{B} rows of tokens for {len(cache.rows)} bound cache rows")
            cache.check_room(T)
            pos = cache.positions(T, self.cfg.sliding_window, tokens.device)
            docs = Documents(None, pos, None, self.cfg.sliding_window, q_offset=cache.pos)
        else:
            docs = Documents.from_offsets(doc_offsets, B, T, self.cfg.sliding_window, tokens.device)
        cos, sin = rope_cos_sin(docs.positions, rope_frequencies(self.cfg, tokens.device))
        x = self.tok_emb(tokens)                                   # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, docs, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> logits (..., vocab)."""
        if self.fast_head is not None:
            return self.fast_head(h)
        return F.linear(h, self.output_weight)

    def forward(self, tokens, doc_offsets=None, targets=None, loss_weights=None):
        """Without targets: logits (B, T, vocab). With targets (B, T) and loss_weights (B, T):
        the float32 scalar sum of loss_weight * cross-entropy (divide by loss_weights.sum(), or a
        sum over a whole global batch, to get the mean)."""
        h = self.hidden(tokens, doc_offsets)
        if targets is None:
            return self.head(h)
        return lm_loss(h, self.output_weight, targets, loss_weights, self.cfg.loss)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (0 if self.lm_head is None else self.lm_head.weight.numel())
        return n


# ----------------------------------------------------------------------------- loss dispatch

# Which loss runs: ModelConfig.loss (train.py --loss). Both compute the same function
# (tests/test_model.py).
#   fused      agentc/kernels/masked_ce.py: untrained rows dropped, logits in chunks, never (N, V) (CUDA, or
#              the CPU interpreter with TRITON_INTERPRET=1); the default on CUDA
#   reference  logits of the trained rows, then F.cross_entropy; the default on CPU
LOSSES = ("auto", "fused", "reference")


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            loss_weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """sum_i loss_weights[i] * CE(hidden[i] @ weight.T, targets[i]), a scalar in float32 (or float64).
    hidden (B, T, dim), weight (vocab, dim), targets and loss_weights (B, T); backend: one of
    LOSSES (ModelConfig.loss)."""
    if resolve_backend(backend, hidden.device, "loss") == "fused" and hidden.dtype != torch.float64:
        from agentc.kernels.masked_ce import masked_cross_entropy  # imports triton: only when used
        return masked_cross_entropy(hidden, weight, targets, loss_weights, reduction="sum")
    h = hidden.reshape(-1, hidden.shape[-1])
    t, w = targets.reshape(-1), loss_weights.reshape(-1).float()
    keep = w.nonzero().squeeze(1)  # about a third of a row is trained: skip the rest's logits
    logits = F.linear(h[keep], weight)                             # (N_trained, vocab)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    return (F.cross_entropy(logits, t[keep], reduction="none") * w[keep]).sum()


# ----------------------------------------------------------------------------- accounting


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), for MFU: 6 per weight of every
    matmul (LM head included, embedding lookup not) plus causal attention over a full row of
    seq_len, 6 * n_layers * H * D * seq_len (half of the 12 LHDT of a full square). Packed rows of
    short documents do less attention work than this counts."""
    d, hd = cfg.dim, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
    matmul_weights = cfg.n_layers * per_layer + cfg.vocab_size * d
    return 6 * matmul_weights + 6 * cfg.n_layers * cfg.n_heads * hd * seq_len


# dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name (torch.cuda.get_device_name()), None if not listed."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
