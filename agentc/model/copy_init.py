"""A copy circuit written into a fresh model's weights: induction from step 0.

An agent copies all the time: a table name from a tool's output into its next call, a city from
the question into a WHERE clause, a value from a result into its answer. In a transformer that is
an induction circuit (Olsson et al., 2022, "In-context learning and induction heads"): a
previous-token head, then a head whose query is the current token and whose key is "the token
before this one", and whose value is copied to the output. Trained from random weights on a CPU
budget, a small model does not form it (experiments/LOG.md), so we build the
circuit by hand, with weights of the ordinary Llama architecture, and let training take it from
there. Checkpoint keys, shapes and the forward pass are unchanged; the model exports to Hugging
Face and GGUF as any other.

The residual stream is given four slots (dims are examples for dim 128):

    C   1 dim    a constant coordinate in every token embedding
    F  14 dims   each token's match code: random +-1 (times the embedding scale)
    G  32 dims   each token's copy code: random +-1
    P  14 dims   empty in the embeddings: layer 0 writes the previous token's F here
    K  32 dims   empty in the embeddings: layer 1 writes the copied token's G here

1. Layer 0, head 0 attends to the previous position. Its query and key read only C, so they are
   the same vector at every position, and the score depends only on the distance, through RoPE:
   pair f of a head turns by theta_f per position, so a query rotated back by theta_f scores
   sum_f A_f cos(theta_f (distance - 1)), highest at distance 1 (fast pairs make the peak sharp).
   Its value/output copy F of that position into P.
2. Layer 1, head 0 is the induction head: its query is the token's own F, its key is P (the
   previous token's F), placed in the slowest rotary pairs, which turn by less than a radian over
   the whole context, so the score is the code match whatever the distance. It attends to the
   position right after an earlier occurrence of the current token; its value/output copy that
   position's G into K.
3. The LM head reads K: the row of token t holds t's copy code there, so the copied token gets a
   logit of kappa and every other token about kappa / sqrt(32) times noise.

Embeddings start at scale 1 instead of 0.02 so that Adam's first updates (lr x 1 per step) do not
erase the codes; RMSNorm makes the forward pass indifferent to that scale. Everything else keeps
the normal initialisation. An untrained model with the circuit continues a repeated random span
(tests/test_copy_init.py); what it does for training is in experiments/LOG.md.
"""
from __future__ import annotations

import math

import torch

from agentc.model.transformer import Transformer, rope_frequencies

PREV_HEAD_AMPLITUDES = (30.0, 30.0, 30.0, 15.0, 8.0)  # score weight of the fastest rotary pairs in layer 0


def _head_views(attn, cfg):
    """(H, D, dim) query/key/value rows and (dim, H, D) output columns of one attention layer."""
    D, d = cfg.head_dim, cfg.dim
    return (attn.wq.weight.view(cfg.n_heads, D, d), attn.wk.weight.view(cfg.n_kv_heads, D, d),
            attn.wv.weight.view(cfg.n_kv_heads, D, d), attn.wo.weight.view(d, cfg.n_heads, D))


def slow_pairs(cfg, context: int) -> list[int]:
    """Rotary pairs that turn by at most one radian over `context` positions: a dot product in them
    barely depends on the distance between query and key."""
    freq = rope_frequencies(cfg)
    return [f for f in range(cfg.head_dim // 2) if freq[f] * context <= 1.0]


@torch.no_grad()
def install_copy_circuit(model: Transformer, context: int | None = None, match: float = 20.0,
                         kappa: float = 4.0, seed: int = 0) -> dict:
    """Overwrite the token embedding, head 0 of layers 0 and 1 and part of the LM head of a
    freshly initialised `model` with the circuit described above. `context`: the longest
    distance the induction head must match across (default cfg.max_seq_len); `match`: score of
    a perfect code match (before softmax); `kappa`: logit of the copied token. Returns the slot
    layout. Raises ValueError, saying what to change, for a config that cannot hold it."""
    cfg = model.cfg
    D, d = cfg.head_dim, cfg.dim
    context = context or cfg.max_seq_len
    if model.lm_head is None:
        raise ValueError("the copy circuit needs an untied LM head (it reads a slot the embeddings leave empty)")
    if cfg.n_layers < 2:
        raise ValueError(f"the copy circuit needs at least 2 layers, the model has {cfg.n_layers}")
    slow = slow_pairs(cfg, context)
    if len(slow) < 4:
        raise ValueError(f"the copy circuit needs at least 4 rotary pairs that turn less than one radian over "
                         f"{context} tokens; head_dim {D} with rope_theta {cfg.rope_theta:g} has {len(slow)}: "
                         f"raise rope_theta (1e6 gives 7 at head_dim 32) or head_dim")
    if len(PREV_HEAD_AMPLITUDES) + len(slow) > D // 2:
        raise ValueError(f"head_dim {D} is too small for the copy circuit (needs fast and slow rotary pairs)")
    n_match = min(2 * len(slow), d // 8)
    n_copy = d // 4
    C = 0
    F = list(range(1, 1 + n_match))
    G = list(range(F[-1] + 1, F[-1] + 1 + n_copy))
    P = list(range(d - n_copy - n_match, d - n_copy))
    K = list(range(d - n_copy, d))
    if G[-1] >= P[0]:
        raise ValueError(f"dim {d} is too small for the copy circuit's slots")
    gen = torch.Generator().manual_seed(seed)
    signs = lambda n: (torch.randint(0, 2, (cfg.vocab_size, n), generator=gen) * 2 - 1).float()  # noqa: E731

    E = model.tok_emb.weight                               # (vocab, dim), scale 1: see the docstring
    E.copy_(torch.randn(E.shape, generator=gen))
    E[:, P + K] = 0
    E[:, C] = 2.0
    E[:, F] = signs(n_match)
    E[:, G] = signs(n_copy)
    # After RMSNorm a row's entries keep about this scale; the layers' outputs match it.
    scale = E.pow(2).mean().sqrt().item()
    c = E[0, C].item() / scale                            # the constant coordinate after RMSNorm

    def clear(views, h):
        for w in (views[0][h], views[1][h], views[2][h], views[3][:, h]):
            w.zero_()

    def move(views, h, src, dst):  # value/output of head h: copy residual dims src into dims dst
        for i, (a, b) in enumerate(zip(src, dst)):
            views[2][h, i, a] = 1.0
            views[3][b, h, i] = scale

    # 1. layer 0, head 0: the previous position, by RoPE alone. In the "rotate half" layout pair f
    # is (f, f + D/2); a query (cos t_f, -sin t_f) against a key (1, 0) scores cos(t_f (i - j - 1)).
    freq = rope_frequencies(cfg)
    l0 = _head_views(model.layers[0].attn, cfg)
    clear(l0, 0)
    for f, amp in enumerate(PREV_HEAD_AMPLITUDES):
        r = math.sqrt(amp * math.sqrt(D)) / c           # SDPA divides the score by sqrt(D)
        l0[0][0, f, C], l0[0][0, f + D // 2, C] = r * math.cos(freq[f]), -r * math.sin(freq[f])
        l0[1][0, f, C] = r
    move(l0, 0, F, P)                                   # F of that token

    # 2. layer 1, head 0: query F (this token), key P (the token before that position), both in
    # the slow pairs; value: G of the attended position -> K.
    l1 = _head_views(model.layers[1].attn, cfg)
    dims = [f + half for f in slow for half in (0, D // 2)][:n_match]
    s = math.sqrt(match * math.sqrt(D) / n_match)
    clear(l1, 0)
    for dim, src_q, src_k in zip(dims, F, P):           # (query dim, key dim) per slow dim
        l1[0][0, dim, src_q] = s
        l1[1][0, dim, src_k] = s
    move(l1, 0, G, K)

    # 3. the LM head reads the copied code
    model.lm_head.weight[:, K] = kappa * E[:, G] / scale / math.sqrt(n_copy)
    return {"constant": C, "match": F, "copy": G, "previous": P, "copied": K, "slow_pairs": slow}
