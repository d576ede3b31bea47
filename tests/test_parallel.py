"""Activation checkpointing (agentc/model/parallel.py): every mode computes the same loss and
gradients in float64, keeps the checkpoint keys, and does recompute what it says it recomputes.
FSDP2 through train.py, on two gloo ranks, is in tests/test_train.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agentc.model.parallel import checkpoint_activations
from agentc.model.transformer import ModelConfig, Transformer


class CountOps(TorchDispatchMode):
    """How many times each aten op runs (forward and backward together)."""

    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func] = self.n.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def run(mode, attention="sdpa", seed=0):
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64, n_layers=3)
    cfg.attention = attention
    torch.manual_seed(seed)
    model = Transformer(cfg).double()
    keys = list(model.state_dict())
    checkpoint_activations(model, mode)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == keys
    g = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 97, (2, 37), generator=g), torch.randint(0, 97, (2, 37), generator=g)
    weights = torch.rand(2, 37, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0, 11, 37, 74])  # flat over the batch: two documents in the first row
    with CountOps() as ops:
        loss = model(tokens, offsets, targets, weights)
        loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, ops.n


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_modes_agree_and_recompute_what_they_say(attention):
    aten = torch.ops.aten
    loss, grads, ops = run("none", attention)
    for mode in ("block", "selective"):
        l2, g2, ops2 = run(mode, attention)
        assert abs(l2 - loss) <= 1e-12 * abs(loss), mode
        for name in grads:
            torch.testing.assert_close(g2[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)
        # the backward runs each block's SiLU again under both modes (3 blocks: 3 forward + 3 again)
        assert ops[aten.silu.default] == 3 and ops2[aten.silu.default] == 6, (mode, ops2[aten.silu.default])
        if mode == "block":  # the block's matmuls again: q, k, v, o, gate, up (its backward needs no
            # output of the last one, down, and recomputation stops early): 6 a block
            assert ops2[aten.mm.default] == ops[aten.mm.default] + 6 * 3
        else:  # selective keeps the matmul outputs
            assert ops2[aten.mm.default] == ops[aten.mm.default]


def test_without_gradients_blocks_run_once():
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64)
    model = Transformer(cfg)
    checkpoint_activations(model, "block")
    with torch.no_grad(), CountOps() as ops:
        model(torch.randint(0, 97, (1, 9)))
    plain = Transformer(cfg)
    with torch.no_grad(), CountOps() as ops_plain:
        plain(torch.randint(0, 97, (1, 9)))
    assert ops.n == ops_plain.n


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="none, block, selective"):
        checkpoint_activations(Transformer(ModelConfig.preset("tiny", vocab_size=97)), "all")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bench_train_under_torchrun(parallel, tmp_path):
    """experiments/bench_train.py on 2 gloo ranks: both ranks' rows counted, one JSON from rank 0."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "experiments/bench_train.py", "--model=tiny", "--seq-len=256", "--vocab-size=300", "--steps=2",
                        "--warmup=1", f"--parallel={parallel}", "--activation-checkpointing=block", f"--out={out}"],
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["ranks"], r["parallel"], r["activation_checkpointing"]) == (2, parallel, "block")
    assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0 and p.stdout.count("wrote ") == 1


def test_memory_model_counts_what_autograd_keeps():
    """bench_train.py's memory model measures one block's saved activations on a 1- and a 2-block
    copy; for 4 blocks its prediction is what autograd keeps for the whole 4-block model."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from bench_train import packed_batch, predict_memory, saved_bytes
    cfg = ModelConfig.preset("tiny", vocab_size=300, max_seq_len=256, n_layers=4)
    batch = packed_batch(2, 256, 300, 60, torch.Generator().manual_seed(0), "cpu")
    for bf16 in (False, True):
        plain = predict_memory(cfg, batch, "cpu", bf16)
        assert plain["activations"] == saved_bytes(cfg, 4, batch, "cpu", bf16)
        P = sum(p.numel() for p in Transformer(cfg).parameters())
        assert plain["weights"] == 4 * P and plain["adamw"] == 8 * P
        sharded = predict_memory(cfg, batch, "cpu", bf16, ranks=2, parallel="fsdp")
        assert sharded["adamw"] == 4 * P and sharded["fsdp_gathered"] > 0
        block = predict_memory(cfg, batch, "cpu", bf16, ac="block")
        assert block["activations"] < plain["activations"]
