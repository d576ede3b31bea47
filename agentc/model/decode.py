"""Decoding steps as compiled graphs: T new tokens for each of n cache rows, through every layer.

    step = DecodeGraphs(model, cache)             # model: fp32, bf16 or int8 (model/quant.py)
    logits = step(tokens, rows)                   # tokens (n, T) continue cache rows `rows`; (n, T, vocab)

At batch 1 a token of SmolLM2-135M is ~135 MB of int8 weights and ~200 small operators; run one by
one from Python (the model's own forward) the operators cost as much as the weights. Here a layer
is one function of plain tensors (its weights, the row's cache, the positions), compiled once by
torch.compile (Inductor: C++ on the CPU, Triton on a GPU) and called for every layer: the layers
share one graph because their weights are inputs, not constants. Shapes are static per bucket
(rows padded to a power of two, T fixed) except the attended length, which is symbolic: one graph
per (rows, T, weight kind), whatever the episode's length. Compiling costs seconds per graph, once
per process (Inductor's on-disk cache makes later processes faster).

An int8 matmul of few rows is a reduction Inductor writes itself: int8 weights widened in
registers, float32 activations and sums (int8 weights times float activations, as the eager
Int8Linear computes them, up to rounding). With more rows it pays to multiply bfloat16 copies of
the int8 weights with oneDNN instead (exact: |q| <= 127 fits bfloat16); which kind is faster for a
bucket depends on the CPU, so it is measured once per machine and remembered (`choose_kind`).

Padding rows write their keys and values to the cache's scratch slot (position max_len, never
read as a key) and their outputs are dropped. Attention is written out (scores, softmax, weighted
sum in float32) so Inductor fuses it with the cache reads; the eager path uses SDPA, so the two
agree to rounding, not bit for bit (tests/test_decode.py bounds the difference and checks greedy
episodes are identical). Anything that fails to compile leaves the caller on the eager path
(agentc/runtime/engine.py warns once).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from agentc.model.quant import Int8Linear
from agentc.model.transformer import Transformer, rope_frequencies

KINDS = ("float", "int8", "int8-bf16")  # a layer's matmuls: the model's float weights; int8 reduction; bf16 copies


def bucket(n: int, most: int) -> int:
    """The number of rows a graph for n rows has: the next power of two, at most `most`."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(most, n))


# ----------------------------------------------------------------------------- weights


def _linear(mod: nn.Module, kind: str) -> tuple:
    """One projection's weights for a kind: ("f", W, bias) | ("q", int8 q, scale, bias) |
    ("qb", bf16 q, scale, bias)."""
    if isinstance(mod, Int8Linear):
        bias = mod.bias
        if kind == "int8-bf16":
            return ("qb", mod.bf16_weight(), mod.scale, bias)
        return ("q", mod.weight, mod.scale, bias)
    return ("f", mod.weight.detach(), None if mod.bias is None else mod.bias.detach())


def _mm(x: torch.Tensor, w: tuple) -> torch.Tensor:
    """x (N, in) @ the projection w, in x's dtype."""
    if w[0] == "f":
        y = F.linear(x.to(w[1].dtype), w[1])
    elif w[0] == "q":  # int8 widened inside the reduction: Inductor reads each weight byte once
        y = (w[1].to(torch.float32) * x.float()[:, None, :]).sum(-1) * w[2]
    else:
        y = F.linear(x.to(torch.bfloat16), w[1]).float() * w[2]
    if w[-1] is not None:
        y = y + w[-1]
    return y.to(x.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def layer_step(w: tuple, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
               kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, shape: tuple) -> torch.Tensor:
    """One block for n rows of T tokens. x (n, T, dim); cos, sin (n, T, 1, D); bias (n, T, S) float32,
    0 where a query may see a key and -inf elsewhere (S: keys attended); kc, vc (B, KV, max_len + 1, D)
    this layer's cache, written at [rows, :, pos]; pos (n, T). shape: (H, KV, D, eps)."""
    attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down = w
    H, KV, D, eps = shape
    n, T, dim = x.shape
    S = bias.shape[-1]
    h = _rms(x, attn_norm, eps).reshape(n * T, dim)
    q = _rope(_mm(h, wq).view(n, T, H, D), cos, sin)
    k = _rope(_mm(h, wk).view(n, T, KV, D), cos, sin)
    v = _mm(h, wv).view(n, T, KV, D)
    r = rows[:, None].expand(n, T)
    kc[r, :, pos] = k.to(kc.dtype)                       # (n, T) entries of (KV, D)
    vc[r, :, pos] = v.to(vc.dtype)
    keys = kc[rows, :, :S].float()                       # (n, KV, S, D): fused into the reductions
    values = vc[rows, :, :S].float()
    qg = q.float().view(n, T, KV, H // KV, 1, D).permute(0, 2, 3, 1, 4, 5)   # (n, KV, G, T, 1, D)
    scores = (qg * keys[:, :, None, None]).sum(-1) * D ** -0.5 + bias[:, None, None]  # (n, KV, G, T, S)
    p = scores.softmax(-1)
    out = (p[..., None] * values[:, :, None, None]).sum(-2)                   # (n, KV, G, T, D)
    out = out.permute(0, 3, 1, 2, 4).reshape(n * T, H * D).to(x.dtype)
    x = x + _mm(out, wo).view(n, T, dim)
    h = _rms(x, mlp_norm, eps).reshape(n * T, dim)
    return x + _mm(F.silu(_mm(h, w_gate)) * _mm(h, w_up), w_down).view(n, T, dim)


def head_step(norm: torch.Tensor, head: tuple, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Final norm and LM head: x (N, dim) -> float32 logits (N, vocab)."""
    return _mm(_rms(x, norm, eps), head).float()


# ----------------------------------------------------------------------------- the graphs


class DecodeGraphs:
    """Compiled decode steps for a model and its static KV cache (model/kv_cache.py, which keeps
    one scratch position past max_len for padding rows). `compile=False` runs the same functions
    eagerly (the reference the tests compare against). `kinds`: {(rows, T): kind} for an int8
    model; a bucket missing there is measured by choose_kind on first use when `measure` (by
    default when compiled), else decodes with "int8"."""

    def __init__(self, model: Transformer, cache, compile: bool = True, kinds: dict | None = None,
                 measure: bool | None = None):
        self.model, self.cache, self.cfg = model, cache, model.cfg
        self.int8 = any(isinstance(m, Int8Linear) for m in model.modules())
        self.kinds = dict(kinds or {})
        self.measure = compile if measure is None else measure  # choose_kind for a new bucket
        self.weights: dict[str, list] = {}
        self.freq = rope_frequencies(self.cfg, cache.k.device)
        c = self.cfg
        self.shape = (c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps)
        self.compiled = compile
        if compile:
            import torch._dynamo
            # one graph per (rows, T, kind) and per model shape in the process: more than the default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.layer = torch.compile(layer_step, dynamic=False)
            self.head = torch.compile(head_step, dynamic=False)
        else:
            self.layer, self.head = layer_step, head_step
        # this cache's per-layer views; their row count and length are symbolic in the graphs, so
        # engines of any size share them
        self.kv = [(cache.k[i], cache.v[i]) for i in range(self.cfg.n_layers)]
        if compile:
            for t in (x for pair in self.kv for x in pair):
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 2)
        self.first_s: dict = {}  # (rows, T, kind) -> seconds of its first call (the compile, when compiled)

    def kind(self, n: int, T: int) -> str:
        """The weights a bucket of n rows x T tokens decodes with: measured here once (choose_kind)."""
        if not self.int8:
            return "float"
        if (n, T) not in self.kinds and self.measure:
            return choose_kind(self, n, T)
        return self.kinds.get((n, T), "int8")

    def _weights(self, kind: str) -> tuple:
        if kind not in self.weights:
            m = self.model
            layers = []
            for b in m.layers:
                a, f = b.attn, b.mlp
                layers.append((b.attn_norm.weight.detach(), *(_linear(p, kind) for p in (a.wq, a.wk, a.wv, a.wo)),
                               b.mlp_norm.weight.detach(), *(_linear(p, kind) for p in (f.w_gate, f.w_up, f.w_down))))
            if m.fast_head is not None:
                head = _linear(m.fast_head, kind)
            else:
                head = ("f", m.output_weight.detach(), None)
            self.weights[kind] = (layers, m.norm.weight.detach(), head)
        return self.weights[kind]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, rows: list[int], kind: str | None = None) -> torch.Tensor:
        """tokens (n, T) continue cache rows `rows` (each at its length, which advances by T);
        the float32 logits (n, T, vocab)."""
        cache, cfg = self.cache, self.cfg
        n, T = tokens.shape
        b = bucket(n, cache.batch)
        kind = kind or self.kind(b, T)  # (may time a few steps on the cache's first rows, first)
        cache.bind(rows)
        cache.check_room(T)
        dev = cache.k.device
        layers, norm, head = self._weights(kind)
        starts = [cache.lengths[r] for r in rows]
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)     # (n, T)
        S = max(max(starts) + T, 2)  # a dynamic size is never 1 (torch.compile specialises 0 and 1)
        row_t = torch.tensor(rows, device=dev)
        if b > n:  # padding rows: the first row again, writing to the scratch slot, output dropped
            tokens = torch.cat([tokens, tokens[:1].expand(b - n, T)])
            row_t = torch.cat([row_t, row_t[:1].expand(b - n)])
            pos = torch.cat([pos, torch.full((b - n, T), cache.max_len, device=dev)])
        key = torch.arange(S, device=dev)
        see = key <= pos[:, :, None]                                                   # (b, T, S)
        if cfg.sliding_window is not None:
            see &= pos[:, :, None] - key < cfg.sliding_window
        see[n:] = True  # padding rows see every key: a finite softmax, dropped
        bias = torch.zeros(b, T, S, device=dev).masked_fill_(~see, float("-inf"))
        angles = pos.float()[..., None] * self.freq
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        cos, sin = angles.cos(), angles.sin()
        x = self.model.tok_emb(tokens)
        t0 = time.perf_counter()
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(bias, 2)  # one graph for every attended length
        for w, (kc, vc) in zip(layers, self.kv):
            x = self.layer(w, x, cos, sin, bias, kc, vc, row_t, pos, self.shape)
        logits = self.head(norm, head, x.reshape(b * T, -1), cfg.norm_eps).view(b, T, -1)
        cache.advance(T)
        if (b, T, kind) not in self.first_s:
            self.first_s[(b, T, kind)] = time.perf_counter() - t0
        return logits[:n]


# ----------------------------------------------------------------------------- which kind, per machine


def kinds_file() -> str:
    return os.path.join(os.environ.get("AGENTC_CACHE", os.path.expanduser("~/.cache/agentc")), "decode_kinds.json")


def machine_key(model: Transformer) -> str:
    """What a measured choice depends on: the CPU (or GPU), threads, torch, the model's shape."""
    c = model.cfg
    if torch.cuda.is_available() and next(model.buffers(), next(model.parameters())).is_cuda:
        dev = torch.cuda.get_device_name()
    else:
        dev = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                dev = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
        except OSError:
            pass
    shape = f"{c.dim}x{c.n_layers}x{c.n_heads}x{c.n_kv_heads}x{c.ffn_dim}x{c.vocab_size}"
    return f"{dev}|threads={torch.get_num_threads()}|torch={torch.__version__}|{shape}"


def choose_kind(graphs: DecodeGraphs, n: int, T: int, repeats: int = 5) -> str:
    """For an int8 model: "int8" or "int8-bf16" for a bucket of n rows x T tokens, whichever
    decodes faster here, timed once (compiled, warm) and remembered in ~/.cache/agentc (per CPU,
    threads, torch version and model shape; AGENTC_CACHE moves it). Times real steps on the
    cache's first n rows at their lengths, which are then restored (the entries written past them
    are never read); with no room there, "int8" for now, measured on a later call."""
    if not graphs.int8:
        return "float"
    path, key = kinds_file(), f"{machine_key(graphs.model)}|rows={n}|T={T}"
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        cache = graphs.cache
        rows = list(range(min(n, cache.batch)))
        saved = [cache.lengths[r] for r in rows]
        if any(s + T > cache.max_len for s in saved):
            return "int8"
        times = {}
        tokens = torch.zeros(len(rows), T, dtype=torch.long, device=cache.k.device)
        for kind in ("int8", "int8-bf16"):
            samples = []
            for _ in range(repeats + 2):  # the first two compile and warm up
                t0 = time.perf_counter()
                graphs(tokens, rows, kind=kind)
                samples.append(time.perf_counter() - t0)
                for r, s in zip(rows, saved):
                    cache.lengths[r] = s
            times[kind] = statistics.median(samples[2:])
        known[key] = {"kind": min(times, key=times.get), "seconds": times}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(known, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a read-only home: measured again next time
    graphs.kinds[(n, T)] = known[key]["kind"]
    return known[key]["kind"]
