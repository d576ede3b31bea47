"""Crash safety of training: kill -9 at random moments, ten times, and --resume still ends with
the weights of an uninterrupted run; a corrupted newest checkpoint is caught by its checksums and
--resume falls back to the one before; a full disk during a checkpoint write leaves the previous
checkpoint intact. Each run is a subprocess (tests/test_train.py has the helpers)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from agentc.model import checkpoint
from test_train import ENV, ROOT, metrics, tiny_run, train

STEPS = 48


def weights(out) -> dict:
    name = open(os.path.join(out, "latest")).read().strip()
    return load_file(os.path.join(out, name, "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def whole(calc_shards, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("crash") / "whole"
    train(*tiny_run(calc_shards, out, f"--max-steps={STEPS}", "--save-every=0"))
    return {"weights": weights(out), "loss": metrics(out)}


@pytest.mark.slow
def test_kill_9_ten_times_then_resume_gives_identical_weights(calc_shards, whole, tmp_path):
    """SIGKILL lands anywhere: mid-step, mid-checkpoint (--save-every=1 writes one per step),
    between the rename and `latest`. Each relaunch resumes from the newest intact checkpoint."""
    out, rng = tmp_path / "killed", random.Random(0)
    first = tiny_run(calc_shards, out, f"--max-steps={STEPS}", "--save-every=1", "--keep=2")
    landed, launches = 0, 0
    while landed < 10 and launches < 20:
        argv = first if launches == 0 else ["--out=" + str(out), "--resume"]
        launches += 1
        proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        log, before = out / "metrics.jsonl", (len((out / "metrics.jsonl").read_text().splitlines())
                                              if (out / "metrics.jsonl").exists() else 0)
        while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) > before):
            time.sleep(0.01)  # training has started (a step was logged): now kill at a random moment
        time.sleep(rng.uniform(0, 0.1))
        landed += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        assert "Traceback" not in err, err
        assert proc.returncode in (0, -signal.SIGKILL), err
        if proc.returncode == 0:   # it finished first: nothing left to kill
            break
    assert landed == 10, f"only {landed} kills landed mid-run"
    p = train("--out=" + str(out), "--resume")
    assert_same_weights(weights(out), whole["weights"])
    assert metrics(out) == whole["loss"]
    # no half-written checkpoint left behind once a save succeeds
    assert not [d for d in os.listdir(out) if d.endswith(".tmp")], os.listdir(out)
    print(f"kill -9: {landed} kills mid-run in {launches} launches; --resume ends with identical weights")


def corrupt(path, how: str) -> None:
    if how == "flip a byte":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(path)


@pytest.fixture(scope="module")
def saved(calc_shards, tmp_path_factory):
    """A finished run with checkpoints at steps 16, 32 and 48, to be copied and damaged."""
    out = tmp_path_factory.mktemp("crash") / "saved"
    train(*tiny_run(calc_shards, out, f"--max-steps={STEPS}", "--save-every=16", "--keep=3"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, how", [("model.safetensors", "flip a byte"), ("optim_rank0.pt", "truncate"),
                                       ("config.json", "remove"), ("meta.json", "truncate")])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous(saved, whole, tmp_path, name, how):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    meta = json.loads((out / "step_000048" / "meta.json").read_text())
    assert {"model.safetensors", "config.json", "optim_rank0.pt", "agent.json"} <= set(meta["files"])
    corrupt(out / "step_000048" / name, how)
    (out / ".latest.x1y2.tmp").write_text("step_0")   # what a kill during a save leaves
    (out / ".step_000040.tmp").mkdir()
    p = train("--out=" + str(out), "--resume")
    assert not [d for d in os.listdir(out) if d.endswith(".tmp")]   # the next save clears them
    assert f"{out}/step_000048 cannot be resumed" in p.stderr and "resuming" in p.stdout, p.stderr
    assert f"resuming {out}/step_000032 at step 32" in p.stdout
    assert_same_weights(weights(out), whole["weights"])


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_clear_line(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    for d in ("step_000016", "step_000032", "step_000048"):
        corrupt(out / d / "model.safetensors", "flip a byte")
    p = train("--out=" + str(out), "--resume", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "no checkpoint in" in lines[0], p.stderr
    assert "step_000048: model.safetensors does not match its checksum" in lines[0]


def can_mount_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m t /mnt"],
        capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare to mount a small tmpfs")
def test_full_disk_during_a_checkpoint_leaves_the_previous_intact(calc_shards, saved, whole, tmp_path):
    size = sum(f.stat().st_size for f in (saved / "step_000016").iterdir())  # one checkpoint
    # a disk with room for the first checkpoint (and the logs), not for a second one
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    argv = [sys.executable, "train.py", *tiny_run(calc_shards, out, f"--max-steps={STEPS}", "--save-every=8")]
    # the tmpfs lives in the namespace: copy what the run left to the real disk before it goes
    after = tmp_path / "after"
    script = (f'mount -t tmpfs -o size={size * 3 // 2 + (256 << 10)} full "{disk}" && "$@"; rc=$?; '
              f'cp -a "{out}" "{after}"; exit $rc')
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *argv],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, p.stdout[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "writing the checkpoint of step 16" in lines[0] and "MB free" in lines[0], p.stderr
    assert f"{out}/step_000008 is intact" in lines[0], lines[0]
    # the previous checkpoint is whole, nothing half-written remains, and the run finishes elsewhere
    assert sorted(os.listdir(after)) == ["latest", "metrics.jsonl", "step_000008"], os.listdir(after)
    meta = json.loads((after / "step_000008" / "meta.json").read_text())
    assert checkpoint.damage(str(after / "step_000008"), meta["files"]) is None
    shutil.rmtree(out, ignore_errors=True)
    train("--out=" + str(after), "--resume")
    assert_same_weights(weights(after), whole["weights"])


def kill_when(proc, ready, rng, most: float) -> None:
    """SIGKILL `proc` a random moment after `ready()` holds (it may have finished by then)."""
    while proc.poll() is None and not ready():
        time.sleep(0.005)
    time.sleep(rng.uniform(0, most))
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_generate_killed_midway_resumes_to_identical_output(tmp_path):
    cmd = [sys.executable, "-m", "agentc.data.generate", "--workflow", "tests.fake_workflow", "--split", "train",
           "--n", "3000", "--workers", "1", "--quiet", "--fault-rate", "0.2"]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole.jsonl")], cwd=ROOT, env=ENV, check=True, capture_output=True)
    out, rng, landed = tmp_path / "killed.jsonl", random.Random(1), 0
    partial = tmp_path / "killed.jsonl.partial"
    for trial in range(4):
        proc = subprocess.Popen([*cmd, "--out", str(out), *(["--resume"] if trial else [])], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 0, rng, 0.5)
        if out.exists():   # it finished before the kill: then it is whole
            assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
            break
        landed += 1        # killed half-way: nothing that looks complete, only OUT.partial
    assert landed >= 3
    subprocess.run([*cmd, "--out", str(out), "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


@pytest.mark.slow
def test_pack_killed_midway_leaves_nothing_that_loads(calc_corpus, tmp_path):
    from agentc.data.loader import Loader
    big = tmp_path / "big.jsonl"
    big.write_text(open(calc_corpus["jsonl"]).read() * 80)
    cmd = [sys.executable, "-m", "agentc.data.pack", str(big), "--tokenizer", calc_corpus["tokenizer"],
           "--seq-len", "256", "--shard-tokens", "4096", "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], cwd=ROOT, env=ENV, check=True, capture_output=True)
    out, rng, landed = tmp_path / "killed", random.Random(2), 0
    for trial in range(5):
        proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: os.path.exists(f"{out}_000.bin"), rng, 0.05)
        if os.path.exists(f"{out}.json"):   # it finished before the kill: then it is whole
            assert_same_pack(tmp_path / "whole", out)
            continue
        landed += 1
        with pytest.raises(ValueError, match="did not finish"):
            Loader(str(out), batch_size=1)
    print(f"pack: {landed} of 5 kills landed before the summary")
    assert landed >= 3
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert_same_pack(tmp_path / "whole", out)


def assert_same_pack(a, b) -> None:
    """The packs with summaries a.json and b.json hold the same rows (their shard names differ)."""
    sa, sb = (json.loads(open(f"{p}.json").read()) for p in (a, b))
    assert {k: v for k, v in sa.items() if k not in ("seconds", "shards")} == \
        {k: v for k, v in sb.items() if k not in ("seconds", "shards")}
    assert len(sa["shards"]) == len(sb["shards"])
    for x, y in zip(sa["shards"], sb["shards"]):
        for ext in (".bin", ".idx"):
            assert (a.parent / (x + ext)).read_bytes() == (b.parent / (y + ext)).read_bytes()
