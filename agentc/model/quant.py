"""Weight-only quantization of a loaded Transformer, for CPU inference (decoding).

Decoding a token reads every weight once and does two FLOPs per weight, so at batch 1 it is bound
by memory bandwidth: the bytes a weight takes are the time it takes. quantize() rewrites a model in
place into one of three kinds:

    fp32  float32 weights and activations (what load / load_gguf give)
    bf16  the whole model in bfloat16 (weights, activations, KV cache); RMSNorm still normalises
          in float32 and rotary angles are computed in float32 (transformer.py does both)
    int8  every nn.Linear of the blocks (wq wk wv wo w_gate w_up w_down) and the LM head become
          Int8Linear: int8 weights with one float scale per output channel (symmetric, absmax).
          Everything else stays float32: embedding lookup, norms, rotary, attention, KV cache.

    model, _ = load_gguf(find_gguf("smollm2-135m"))
    model = quantize(model, "int8")     # then model.hidden(..., cache=) / model.head(h) as before

A quantized model is for inference only: Int8Linear holds no parameters (nothing to train) and
refuses to be saved, so checkpoint.save of an int8 model raises instead of writing int8 tensors
under the float names a loader expects; save the float model, quantize after loading. A bf16
model keeps every name and saves like any other (as bfloat16 tensors).

The head of a tied model (SmolLM2) shares tok_emb.weight with the embedding: quantize() leaves the
embedding in float32 (a lookup reads one row per token) and puts an int8 copy of the head in
model.fast_head, which Transformer.head() calls when set.

What it buys (SmolLM2-135M, 2 threads of a Xeon with AVX512-BF16 and AMX, 512-token context,
greedy): batch 1 decodes 26 tokens/s in fp32, 24 in bf16, 35 in int8; 16 rows at once 142, 219 and
154 tokens/s in all. Not the 4x the bytes promise: at batch 1 about 10 ms of each token is Python
and operator overhead (a 30-layer model with negligible weights takes that long), and the int8
kernel streams weights at ~10 GB/s where fp32's sgemv gets ~22. At 16 rows attention over the
float32 KV cache is half the step, which bf16 halves. Greedy tokens against fp32 over 5 chat
prompts x 64 tokens: bf16 and int8 agree on 98% of next tokens given the same prefix; the
largest logit difference is 1.2 (bf16) and 2.7 (int8), logits having std 6.7.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("fp32", "bf16", "int8")
# Int8Linear's CPU kernel for few rows (decoding) streams int8 weights but its cost grows with every
# row; from this many rows on (prefill, large batches) widening the weights to bfloat16 once and
# running oneDNN's bf16 matmul (AMX where the CPU has it) is faster. Measured on SmolLM2-135M's
# shapes, 2 threads: the two cross between 16 and 64 rows.
DEQUANT_MIN_ROWS = 32


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 q and (N,) float32 scale with w ~ q * scale[:, None]:
    per output channel, symmetric, the channel's largest |w| maps to 127. The scale is rounded to
    a bfloat16 value first, so the bf16 kernel below multiplies by exactly the scale q was made
    with (at worst the largest weight of a channel clips by 0.4% of itself)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16).float()
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias from int8 weights q and per-output-channel scales. The output
    has the input's dtype. Three ways to compute it, all weight-only (activations are never int8):
      few rows, on the CPU   aten._weight_int8pack_mm: int8 weights widened in registers, bf16
                             activations, fp32 accumulation, bf16 out; reads 1/4 of fp32's bytes
      many rows, on the CPU  (x in bf16) @ q.to(bf16).T, then * scale: q is exact in bf16 (the
                             bf16 copy is made once and kept)
      anything else          the same in float32 (a GPU, or in_features not a multiple of 16:
                             torch 2.13's int8pack kernel returns garbage or crashes on those)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = int8_weight(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)                           # float32
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))   # the same values, for the kernel
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.kernel = self.in_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        self._bf16 = None  # q as bfloat16 (exact), made on first use by a many-row product and kept

    def bf16_weight(self) -> torch.Tensor:
        """q widened to bfloat16 once (|q| <= 127 is exact there): many-row products reuse it
        instead of widening every call. Costs 2 bytes per weight beside the int8 one."""
        if self._bf16 is None or self._bf16.device != self.weight.device:
            self._bf16 = self.weight.to(torch.bfloat16)
        return self._bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if not (self.kernel and x.is_cpu):
            y = F.linear(x2.float(), self.weight.float()) * self.scale
        elif x2.shape[0] < DEQUANT_MIN_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale_bf16)
        else:
            y = F.linear(x2.to(torch.bfloat16), self.bf16_weight()) * self.scale
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{prefix.rstrip('.') or 'this module'} is int8-quantized for inference and is "
                           "not saved: save the float model and quantize it after loading")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


@torch.no_grad()
def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Rewrite a Transformer in place for inference as `kind` (one of KINDS); returns it.
    ValueError for an unknown kind, or for an int8 model (its float weights are gone)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; choose from {', '.join(KINDS)}")
    if is_quantized(model):
        raise ValueError("this model is already int8-quantized; quantize a freshly loaded float model")
    model.eval()
    model.quant_kind = kind  # what the runtime's worker processes apply to their own copy (runtime/evaluate.py)
    if kind == "fp32":
        return model.float()
    if kind == "bf16":
        return model.to(torch.bfloat16)
    model.float()  # int8: float32 around the int8 products
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    model.fast_head = Int8Linear(model.output_weight)  # the tied embedding (or lm_head) stays float
    return model
