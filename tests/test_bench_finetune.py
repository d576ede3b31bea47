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


def test_measure_one_tiny_variant():
    """A step of each kind the bench times, on a tiny model: the figures it reports hang together.
    Not heap (process-wide: it would change this test process's allocator)."""
    cfg = ModelConfig.preset("tiny", vocab_size=300, tie_embeddings=True)
    torch.manual_seed(0)
    state = Transformer(cfg).state_dict()
    batches = [packed_batch(2, 64, cfg.vocab_size, 20, torch.Generator().manual_seed(i), "cpu") for i in range(3)]
    peaks = {"fp32": {"peak_gflops": 1.0}, "bf16": {"peak_gflops": 2.0}}
    r = bf.measure(state, cfg, "full-bf16+fused", batches, steps=2, warmup=1, peaks=peaks)
    assert r["precision"] == "bf16" and r["options"] == ["fused"] and r["compile_s"] is None
    assert len(r["step_s"]) == 2 and len(r["warmup_s"]) == 1
    assert r["tokens_per_s"] == pytest.approx(128 / r["step_s_median"])
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / 2.0)
    other = r["other_load"]
    assert other is None or 0 <= other <= 1


@pytest.mark.slow
def test_compiled_blocks_train_the_same_function():
    """full-fp32+blocks (each block compiled, the attention call eager) gives the eager losses on
    fresh rows (other document counts) every step, and puts the attention back afterwards."""
    cfg = ModelConfig.preset("tiny", vocab_size=300, tie_embeddings=True)
    torch.manual_seed(0)
    state = Transformer(cfg).state_dict()
    batches = [packed_batch(2, 64, cfg.vocab_size, 20, torch.Generator().manual_seed(i), "cpu") for i in range(4)]
    peaks = {"fp32": {"peak_gflops": 1.0}}
    attend = bf.transformer.attend
    eager = bf.measure(state, cfg, "full-fp32", batches, steps=2, warmup=2, peaks=peaks)
    compiled = bf.measure(state, cfg, "full-fp32+blocks", batches, steps=2, warmup=2, peaks=peaks)
    assert bf.transformer.attend is attend
    assert compiled["compile_s"] is not None
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=1e-5)
