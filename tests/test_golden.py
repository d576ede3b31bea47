"""Golden losses (the llm.c habit): the first 10 float32 training losses of a fixed-seed `tiny` run
of train.py, pinned to 1e-6. Any change to the model, its initialisation, the loss, the optimizer,
the schedule, the loader or the batch arithmetic that moves a number fails here, even when every
other test still passes. A deliberate change re-pins the values and says why in its commit.

The data is synthetic (numpy seed 0, written straight into a shard), so changes to the workflows,
the tokenizer or the packer do not move these numbers: only training does.

How the pinned values were made (and how to remake them):

    python tests/test_golden.py          # prints GOLDEN for this machine; paste it below

on a 2-core AMD EPYC with AVX-512 (torch 2.13.0+cpu, numpy 2.4.6, Python 3.11.7), 2026-12-05.
Other CPU kernels (ATEN_CPU_CAPABILITY=avx2 or =default, MKL_CBWR=COMPATIBLE) moved some values by
one float32 step (4.8e-7), inside the tolerance; changing norm_eps to 1e-6 or beta2 to 0.951 moved
them by 2e-6 to 3e-3, outside it.
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, ROW, ROWS = 300, 129, 16   # rows of 128 inputs + 1; 16 rows = 4 steps of 2 rows x 2 micro-batches
FLAGS = ["--model=tiny", "--batch-size=2", "--total-batch-tokens=512", "--max-steps=10", "--lr=3e-3",
         "--dtype=float32", "--attn=sdpa", "--loss=reference", "--seed=1337", "--eval-every=0",
         "--save-every=0", "--eval-episodes=0", "--wandb=disabled"]

GOLDEN = [5.6965651512145996, 5.7102265357971191, 5.7207503318786621, 5.7267169952392578, 5.3397932052612305,
          5.4679079055786133, 5.3189444541931152, 5.2985730171203613, 5.1528320312500000, 5.3252177238464355]


def write_data(prefix: str) -> None:
    """ROWS rows of random tokens cut into 1-5 documents each; each document opens with token 0 at
    weight 0 (as <|begin|> does), and about half of the rest is trained (weight 1)."""
    from agentc.data.pack import write_shard
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, VOCAB, size=(ROWS, ROW))
    weights = (rng.rand(ROWS, ROW) < 0.5).astype(np.float32)
    row_ptr, starts = [0], []
    for r in range(ROWS):
        cuts = [0] + sorted(rng.choice(np.arange(8, ROW - 8), size=rng.randint(0, 5), replace=False).tolist())
        for c in cuts:
            tokens[r, c], weights[r, c] = 0, 0.0
        starts += cuts
        row_ptr.append(len(starts))
    sources = np.where(weights > 0, 3, 0)  # model / template: only what the loader passes on matters here
    write_shard(prefix, tokens, weights, sources, np.array(row_ptr), np.array(starts),
                np.arange(len(starts)), VOCAB)


def golden_losses(tmp: str) -> list[float]:
    write_data(os.path.join(tmp, "golden_000"))
    out = os.path.join(tmp, "run")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data={tmp}/golden_000.bin",
                        f"--out={out}", *FLAGS], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [e["train/loss"] for e in map(json.loads, f) if "train/loss" in e]


def test_first_ten_losses_are_the_pinned_ones(tmp_path):
    got = golden_losses(str(tmp_path))
    assert len(got) == 10
    diffs = [abs(a - b) for a, b in zip(got, GOLDEN)]
    assert max(diffs) <= 1e-6, "training numerics moved:\n" + "\n".join(
        f"  step {i + 1}: {a:.16f} pinned {b:.16f} (diff {d:.1e})" for i, (a, b, d) in enumerate(zip(got, GOLDEN, diffs)))
    assert got[-1] < got[0]  # it trains: the numbers are a real run's, not a constant


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as d:
        losses = golden_losses(d)
    print("GOLDEN = [" + ", ".join(f"{x:.16f}" for x in losses) + "]")
