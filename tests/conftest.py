"""Shared fixtures: small corpora of trajectories, each with a tokenizer trained on it, built once.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before
the first kernel is defined, so it is set here, before any test module imports one.

Engines decode eagerly here (AGENTC_COMPILE=0, inherited by the scripts tests run): compiling a
decode graph costs seconds per model shape, and most tests build their own small model. The
compiled steps are tested where they are asked for by name (tests/test_decode.py,
tests/test_engine_fast.py)."""
import gc
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AGENTC_COMPILE", "0")

from agentc.data import generate, tokenizer
from agentc.workflows import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The code workflow refuses to run model code without OS isolation (CI installs bubblewrap). Where
# none works, its tests run unisolated rather than fail (tests/test_sandbox.py skips its battery).
if sandbox.isolation() is None:
    os.environ["AGENTC_UNSAFE_SANDBOX"] = "1"
    sandbox._unsafe = True


def _corpus(d, workflow: str, n: int, vocab_size: int) -> dict:
    out = str(d / "train.jsonl")
    generate.main(["--workflow", workflow, "--split", "train", "--n", str(n), "--out", out,
                   "--workers", "1", "--quiet"])
    tok_path = tokenizer.train([out], str(d / "tok"), vocab_size=vocab_size)
    return {"dir": d, "jsonl": out, "tokenizer": tok_path, "tok": tokenizer.Tokenizer(tok_path)}


def pytest_collection_finish(session):
    """What is alive once the tests are collected (torch, transformers, the test modules) lives to the
    end: frozen out of the garbage collector, whose full passes stop walking it again and again (a
    third of the time the collector took in the default run)."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip themselves on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def calc_corpus(tmp_path_factory):
    """120 trajectories of the tiny test workflow (tests/fake_workflow.py)."""
    return _corpus(tmp_path_factory.mktemp("calc"), "tests.fake_workflow", 120, 420)


@pytest.fixture(scope="session")
def sql_corpus(tmp_path_factory):
    """80 trajectories of the SQL workflow: multi-line tables, quotes, several calls each."""
    return _corpus(tmp_path_factory.mktemp("sql"), "sql", 80, 1500)


@pytest.fixture(params=["calc_corpus", "sql_corpus"])
def any_corpus(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def calc_shards(calc_corpus, tmp_path_factory):
    """calc_corpus packed into 512-token rows (about 3 trajectories each): train = its
    trajectories, val = the first 30 again."""
    from agentc.data import pack
    d = tmp_path_factory.mktemp("calc_shards")
    val_jsonl = d / "val.jsonl"
    val_jsonl.write_text("".join(open(calc_corpus["jsonl"]).readlines()[:30]))
    for name, src in (("train", calc_corpus["jsonl"]), ("val", str(val_jsonl))):
        pack.main([src, "--tokenizer", calc_corpus["tokenizer"], "--seq-len", "512", "--out", str(d / name),
                   "--quiet"])
    return {"train": str(d / "train"), "val": str(d / "val"), "vocab_size": calc_corpus["tok"].vocab_size}


@pytest.fixture(scope="session")
def trained_run(calc_shards, tmp_path_factory):
    """A train.py --out directory with one checkpoint (a compiled agent) after one step of the tiny
    model on calc_shards, trained in this process (runpy). Tests copy it before they change it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    flags = [f"--data={calc_shards['train']}", "--model=tiny", "--batch-size=2", "--max-steps=1",
             "--eval-episodes=0", "--wandb=disabled", "--dtype=float32", f"--out={out}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py", *flags])
        mp.setattr(sys, "excepthook", sys.excepthook)
        mp.setattr(signal, "signal", lambda *a: None)  # train.py's Ctrl-C handler stays out of pytest
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    assert e.value.code in (0, None)
    step = (out / "latest").read_text().strip()
    return {"out": out, "ck": out / step, "step": step, "shards": calc_shards["train"]}


@pytest.fixture
def run_script():
    """Run a repository script (`python ARGS...`) from the repository root, one torch thread,
    and fail the test with its stderr if it fails."""
    def run(*args, env=None, timeout=900):
        p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        assert p.returncode == 0, p.stderr[-3000:]
        return p
    return run
