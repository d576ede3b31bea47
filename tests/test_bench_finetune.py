"""experiments/bench_finetune.py: the variants it accepts, the FLOPs it counts against the CPU's
matmul peak, and one measured step on a tiny model (not SmolLM2: seconds, not minutes)."""
import os
import sys

import pytest
import torch

from agentc.model.transformer import ModelConfig, Transformer, flops_per_token

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import bench_finetune as bf
from bench_train import packed_batch


def test_variants_parse_and_refuse():
    assert bf.parse("full-fp32") == (False, set())
    assert bf.parse("full-bf16+fused+heap+blocks") == (True, {"fused", "heap", "blocks"})
    for bad in ("lora16-bf16", "full-bf16+fast", "full-fp32+fused+fused", "full-bf16+compile+blocks"):
        with pytest.raises(SystemExit):
            bf.parse(bad)
    for v in bf.DEFAULT:
        bf.parse(v)


def test_useful_flops_count_trained_head_rows_and_document_attention():
    cfg = ModelConfig.preset("tiny", vocab_size=300)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    weights = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.float)
    offsets = torch.tensor([0, 3, 8], dtype=torch.int32)           # documents of 3 and 5 tokens
    got = bf.useful_flops(cfg, [tokens, tokens, weights, offsets])
    d, hd = cfg.dim, cfg.head_dim
    per_block = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
    assert got["blocks"] == 6 * cfg.n_layers * per_block * 8
    assert got["lm_head"] == 6 * cfg.vocab_size * d * 3               # three trained tokens
    assert got["attention"] == 6 * cfg.n_layers * cfg.n_heads * hd * (3 ** 2 + 5 ** 2)
    assert got["total"] == got["blocks"] + got["lm_head"] + got["attention"]
    # one document a row, every token trained: flops_per_token's full-row count, times the tokens
    full = bf.useful_flops(cfg, [tokens, tokens, torch.ones(1, 8), torch.tensor([0, 8], dtype=torch.int32)])
    assert full["total"] == flops_per_token(cfg, 8) * 8


def test_matmul_peak_is_the_best_gemm():
    cfg = ModelConfig.preset("tiny", vocab_size=300)
    peaks = bf.matmul_peak(cfg, tokens=64, trained=20, runs=1)
    for name in ("fp32", "bf16"):
        rates = [g["gflops"] for g in peaks[name]["gemms"]]
        assert len(rates) == len(bf.gemms(cfg, 64, 20)) and min(rates) > 0
        assert peaks[name]["peak_gflops"] == max(rates)


def tiny():
    """A tiny tied model's state and four batches of packed rows (fresh document lengths each)."""
    cfg = ModelConfig.preset("tiny", vocab_size=300, tie_embeddings=True)
    torch.manual_seed(0)
    batches = [packed_batch(2, 64, cfg.vocab_size, 20, torch.Generator().manual_seed(i), "cpu") for i in range(4)]
    return cfg, Transformer(cfg).state_dict(), batches


PEAKS = {"fp32": {"peak_gflops": 1.0}, "bf16": {"peak_gflops": 2.0}}


def test_measure_tiny_variants_in_turn():
    """Two variants stepped in turn on a tiny model: the figures they report hang together, and
    fused AdamW trains what the foreach one does. Not heap (process-wide: it would change this
    test process's allocator), and heap with a variant without it is refused."""
    cfg, state, batches = tiny()
    plain, fused = bf.measure(state, cfg, ["full-fp32", "full-fp32+fused"], batches, steps=2, warmup=2, peaks=PEAKS)
    assert [r["variant"] for r in (plain, fused)] == ["full-fp32", "full-fp32+fused"]
    assert fused["options"] == ["fused"] and fused["compile_s"] is None
    assert len(fused["step_s"]) == 2 and len(fused["warmup_s"]) == 2 and len(fused["losses"]) == 4
    assert fused["tokens_per_s"] == pytest.approx(128 / fused["step_s_median"])
    assert fused["fraction_of_peak"] == pytest.approx(fused["achieved_gflops"] / 1.0)
    assert fused["other_load"] is None or 0 <= fused["other_load"] <= 1
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="heap"):
        bf.measure(state, cfg, ["full-fp32", "full-fp32+heap"], batches, steps=1, warmup=0, peaks=PEAKS)


@pytest.mark.slow
def test_compiled_blocks_train_the_same_function():
    """full-fp32+blocks (each block compiled, the attention call eager) gives the eager losses on
    fresh rows (other document counts) every step, and puts the attention back afterwards."""
    cfg, state, batches = tiny()
    attend = bf.transformer.attend
    eager, compiled = bf.measure(state, cfg, ["full-fp32", "full-fp32+blocks"], batches, steps=2, warmup=2,
                                 peaks=PEAKS)
    assert bf.transformer.attend is attend
    assert compiled["compile_s"] is not None
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=1e-5)
