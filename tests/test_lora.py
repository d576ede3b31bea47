"""LoRA adapters (agentc/model/lora.py) and train.py's --lora-rank and --freeze-layers: the wrapped
model starts as the base, only adapters learn in the blocks, a merged copy computes the same and
saves under the usual keys, and a LoRA run resumes from its checkpoint."""
import json
import os

import pytest
import torch

from agentc.model import checkpoint, lora
from agentc.model.transformer import ModelConfig, Transformer
from tests.test_train import metrics, saved_step, tiny_run, train


def model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64,
                      qkv_bias=True)
    return Transformer(cfg).double()


def tokens():
    return torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))


def perturb(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)


def test_starts_as_the_base_and_trains_only_adapters():
    m = model()
    want = m(tokens())
    params = lora.add_lora(m, rank=4, alpha=8)
    assert len(params) == 2 * 7 * 3
    assert torch.equal(m(tokens()), want)                   # B = 0: exactly the base
    perturb(m)
    m(tokens()).sum().backward()
    for name, p in m.layers.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
        elif ".base." in name:
            assert not p.requires_grad and p.grad is None   # no weight gradient is ever computed
    assert m.tok_emb.weight.grad is not None                # the rest of the model still trains


def test_merged_computes_the_same_under_the_usual_keys(tmp_path):
    base_keys = set(model().state_dict())
    m = model()
    lora.add_lora(m, rank=3, alpha=5)
    perturb(m)
    want = m(tokens())
    flat = lora.merged(m)
    assert set(flat.state_dict()) == base_keys
    assert torch.allclose(flat(tokens()), want, atol=1e-10, rtol=0)
    assert flat.tok_emb.weight is m.tok_emb.weight          # what is not adapted is shared, not copied
    assert torch.equal(m(tokens()), want)                   # and the LoRA model is untouched
    checkpoint.save(flat, str(tmp_path))
    assert set(checkpoint.load(str(tmp_path), dtype=None).state_dict()) == base_keys


def test_adapters_resume_on_the_merged_weights(tmp_path):
    m = model()
    lora.add_lora(m, rank=4, alpha=8)
    perturb(m)
    want = m(tokens())
    checkpoint.save(lora.merged(m), str(tmp_path))
    state = lora.adapter_state(m)
    again = checkpoint.load(str(tmp_path), dtype=None)
    lora.add_lora(again, rank=4, alpha=8)
    lora.load_adapters(again, state)
    assert torch.allclose(again(tokens()), want, atol=1e-10, rtol=0)
    for (name, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12), name      # the frozen weights come back too
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapters(again, {k: v for k, v in list(state.items())[:-1]})
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(model(), rank=0, alpha=1)


@pytest.mark.slow
def test_train_py_lora_and_frozen_layers_resume(calc_shards, tmp_path):
    """A LoRA run with its first block frozen, cut after 6 steps and resumed, follows the
    uninterrupted run's losses; its checkpoint is a plain agentc checkpoint."""
    flags = ("--lora-rank=4", "--freeze-layers=1", "--max-steps=12", "--eval-every=0", "--eval-episodes=0")
    whole = tmp_path / "whole"
    p = train(*tiny_run(calc_shards, whole, *flags, "--save-every=0"))
    assert "LoRA rank 4 adapters, the first 1 blocks frozen" in p.stdout
    cut = tmp_path / "cut"
    train(*tiny_run(calc_shards, cut, *flags, "--save-every=6", "--keep=5"))
    step6 = cut / "step_000006"
    assert json.loads((step6 / "meta.json").read_text())["step"] == 6
    # resume from step 6: drop the later checkpoint and its metrics
    import shutil
    shutil.rmtree(cut / "step_000012")
    (cut / "latest").write_text("step_000006\n")
    with open(cut / "metrics.jsonl") as f:
        lines = [x for x in f if json.loads(x).get("step", 0) <= 6]
    (cut / "metrics.jsonl").write_text("".join(lines))
    train("--out=" + str(cut), "--resume")
    assert saved_step(cut) == 12
    a, b = metrics(whole), metrics(cut)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    flat = checkpoint.load(str(cut / "step_000012"))
    assert not any("lora" in k or ".base." in k for k in flat.state_dict())
    assert os.path.exists(cut / "step_000012" / "lora.safetensors")
    # between steps 6 and 12 the frozen first block never moved; the second did
    mid = checkpoint.load(str(step6))
    for name, w in flat.layers[0].state_dict().items():
        assert torch.equal(w, mid.layers[0].state_dict()[name]), name
    assert not torch.equal(flat.layers[1].attn.wq.weight, mid.layers[1].attn.wq.weight)
