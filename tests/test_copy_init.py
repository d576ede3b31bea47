"""The hand-built copy circuit (model/copy_init.py): an untrained model with it repeats spans it
has seen, through ordinary Llama weights; a normally initialised one does not; configs that
cannot hold it are refused with a reason; train.py --copy-init installs it."""
import math
import os
import subprocess
import sys

import pytest
import torch

import agentc.model.transformer as T
from agentc.model import checkpoint
from agentc.model.copy_init import install_copy_circuit
from agentc.model.transformer import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repeated_spans(gen, vocab: int, gap: int, batch: int = 4, span: int = 20):
    """(batch, 5 + span + gap + span) random tokens in which the span after the first 5 comes back
    after `gap` more random tokens; returns the sequence and the index where the repeat starts."""
    x = torch.randint(10, vocab, (batch, span), generator=gen)
    seq = torch.cat([torch.randint(10, vocab, (batch, 5), generator=gen), x,
                     torch.randint(10, vocab, (batch, gap), generator=gen), x], 1)
    return seq, 5 + span + gap


def repeat_accuracy(model, gen, vocab, gap):
    """Top-1 accuracy of the model on the tokens of the repeated span it can predict (all but
    its first), as a fraction."""
    seq, start = repeated_spans(gen, vocab, gap)
    with torch.no_grad():
        logits = model(seq[:, :-1])
    return (logits[:, start:].argmax(-1) == seq[:, start + 1:]).float().mean().item()


def config(**kw):
    return ModelConfig.preset("mini", vocab_size=kw.pop("vocab_size", 1000), max_seq_len=1024, **kw)


@pytest.mark.parametrize("gap", [0, 37, 300])
def test_untrained_model_with_the_circuit_copies(gap):
    gen = torch.Generator().manual_seed(1000 + gap)
    torch.manual_seed(gap)
    plain = Transformer(config())
    built = Transformer(config())
    install_copy_circuit(built, seed=gap)
    assert repeat_accuracy(plain, gen, 1000, gap) < 0.05   # random weights guess (1 in 1000)
    assert repeat_accuracy(built, gen, 1000, gap) > 0.7


def test_the_two_heads_do_what_they_are_built_for():
    """Layer 0 head 0 looks at the previous position; layer 1 head 0 at the token after the
    earlier occurrence of the current one."""
    torch.manual_seed(0)
    model = Transformer(config(vocab_size=700))
    install_copy_circuit(model)
    seq, start = repeated_spans(torch.Generator().manual_seed(1), 700, gap=50, batch=2)
    seen = []
    original = T.attend

    def spy(q, k, v, docs, backend="auto"):
        seen.append((q, k))
        return original(q, k, v, docs, backend)
    T.attend = spy
    try:
        with torch.no_grad():
            model(seq)
    finally:
        T.attend = original
    n = seq.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    def probs(layer, head=0):
        q, k = seen[layer]  # (B, T, H, D)
        s = q[:, :, head] @ k[:, :, head].transpose(1, 2) / math.sqrt(q.shape[-1])
        return s.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, T, T)
    prev = probs(0).diagonal(-1, 1, 2)                      # attention of i on i - 1
    assert prev.mean() > 0.9, prev.mean()
    span = start - 5  # distance between the two copies
    p = probs(1)
    hits = torch.stack([p[:, i, i - span + 1] for i in range(start + 1, n)])
    assert hits.mean() > 0.7, hits.mean()


def test_checkpoint_keys_and_round_trip_are_unchanged(tmp_path):
    torch.manual_seed(0)
    model = Transformer(config())
    keys = set(model.state_dict())
    install_copy_circuit(model)
    assert set(model.state_dict()) == keys
    checkpoint.save(model, str(tmp_path))
    again = checkpoint.load(str(tmp_path))
    x = torch.randint(0, 1000, (1, 33))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("overrides, message", [
    (dict(tie_embeddings=True), "untied"),
    (dict(n_layers=1), "2 layers"),
    (dict(rope_theta=10000.0), "rope_theta"),
])
def test_configs_that_cannot_hold_it_are_refused(overrides, message):
    model = Transformer(config(**overrides))
    with pytest.raises(ValueError, match=message):
        install_copy_circuit(model)


@pytest.mark.slow
def test_train_py_installs_it(calc_shards, tmp_path):
    """--copy-init on a scratch run: the circuit is there after a few steps of training (the
    repeated-span test), and --copy-init with --init-from is refused."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
    out = tmp_path / "run"
    flags = ["--data=" + calc_shards["train"], "--model=mini", "--batch-size=1", "--max-steps=5", "--lr=1e-3",
             "--wandb=disabled", "--eval-episodes=0", "--out=" + str(out)]
    p = subprocess.run([sys.executable, "train.py", *flags, "--copy-init"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "copy circuit: layer 0 head 0" in p.stdout
    model = checkpoint.load(str(out / "step_000005"))
    vocab = calc_shards["vocab_size"]
    assert repeat_accuracy(model, torch.Generator().manual_seed(5), vocab, gap=30) > 0.6
    p = subprocess.run([sys.executable, "train.py", *flags[:-1], "--out=" + str(tmp_path / "other"),
                        "--init-from=" + str(out), "--copy-init"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--copy-init builds a circuit" in p.stderr
