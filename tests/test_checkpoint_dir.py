"""The run directory of agentc/train/ in one process, without train.py: checkpoints written whole
and pruned, read back into the model, optimizer, data position and RNG; a damaged newest one
skipped; a failed write that leaves nothing behind; the flags a resume keeps; metrics.jsonl trimmed
on resume; a signal that asks for a save. tests/test_train.py and tests/test_crash.py run the same
through train.py as real processes."""
import json
import os
import random
import signal

import pytest
import torch

from agentc.model import checkpoint
from agentc.model.muon import build_optimizer
from agentc.model.transformer import ModelConfig, Transformer
from agentc.train import checkpoints
from agentc.train.metrics import Metrics


class FakeLoader:
    """The two methods of agentc.data.loader.Loader a checkpoint uses."""

    def __init__(self, step=0, batch=4):
        self.step, self.batch = step, batch

    def state_dict(self):
        return {"step": self.step, "global_batch": self.batch}

    def load_state_dict(self, state):
        if state["global_batch"] != self.batch:
            raise ValueError(f"global_batch {state['global_batch']} vs {self.batch}")
        self.step = state["step"]


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=37, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48,
                                    max_seq_len=64))
    return model, build_optimizer(model, 1e-2, (0.9, 0.95), 0.1)


def train_step(model, optimizer):
    tokens = torch.randint(0, 37, (1, 9))
    loss = model(tokens[:, :-1], torch.tensor([0, 8], dtype=torch.int32), tokens[:, 1:], torch.ones(1, 8))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def save(out, step, model, optimizer, loader, keep=2):
    meta = {"data": loader.state_dict(), "model": model.cfg.to_dict(), "args": {"lr": 0.01}}
    return checkpoints.save(str(out), step, model, optimizer, meta, ({}, {"step": step}, None), keep, fsdp=False)


def test_saved_checkpoints_resume_the_same_state_and_older_ones_are_pruned(tmp_path):
    model, optimizer = tiny()
    for step in (1, 2, 3):
        train_step(model, optimizer)
        path = save(tmp_path, step, model, optimizer, FakeLoader(step))
    expected_draws = torch.rand(3), random.random()  # what the run would draw next
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000002", "step_000003"]  # keep=2
    assert (tmp_path / "latest").read_text() == "step_000003\n" and path == str(tmp_path / "step_000003")
    assert checkpoints.latest(str(tmp_path)) == path
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "optim_rank0.pt", "meta.json"):  # readable like any other file
        assert (tmp_path / "step_000003" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    meta = json.loads((tmp_path / "step_000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["args"] == {"lr": 0.01}
    assert {"model.safetensors", "config.json", "agent.json", "optim_rank0.pt"} <= set(meta["files"])
    found, saved = checkpoints.resumable(str(tmp_path))
    assert found == path and saved["step"] == 3
    fresh = checkpoint.load(found)
    fresh_opt = build_optimizer(fresh, 1e-2, (0.9, 0.95), 0.1)
    loader = FakeLoader()
    torch.manual_seed(123)  # elsewhere in the random streams
    random.seed(5)
    checkpoints.restore(found, saved, fresh, fresh_opt, loader, fsdp=False)
    assert loader.step == 3
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert len(optimizer.state) == len(fresh_opt.state) > 0
    for a, b in zip(optimizer.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    again = torch.rand(3), random.random()
    assert torch.equal(again[0], expected_draws[0]) and again[1] == expected_draws[1]


def test_a_damaged_newest_checkpoint_is_skipped_and_all_damaged_is_one_error(tmp_path, capsys):
    model, optimizer = tiny()
    for step in (1, 2):
        save(tmp_path, step, model, optimizer, FakeLoader(step))
    with open(tmp_path / "step_000002" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\x00")
    found, saved = checkpoints.resumable(str(tmp_path))
    assert found == str(tmp_path / "step_000001") and saved["step"] == 1
    assert "step_000002 cannot be resumed: model.safetensors does not match its checksum" in capsys.readouterr().err
    os.remove(tmp_path / "step_000001" / "optim_rank0.pt")
    with pytest.raises(ValueError, match="no checkpoint in .* is intact: step_000002: .*; "
                                         "step_000001: optim_rank0.pt is missing"):
        checkpoints.resumable(str(tmp_path))
    assert checkpoints.resumable(str(tmp_path / "empty")) == (None, {})


def test_restore_refuses_another_global_batch(tmp_path):
    model, optimizer = tiny()
    save(tmp_path, 1, model, optimizer, FakeLoader(1, batch=4))
    found, saved = checkpoints.resumable(str(tmp_path))
    with pytest.raises(ValueError, match="cannot resume .* with these batch flags: global_batch 4 vs 8"):
        checkpoints.restore(found, saved, model, optimizer, FakeLoader(batch=8), fsdp=False)
    with pytest.raises(ValueError, match="--fsdp cannot resume"):
        checkpoints.restore(found, saved, model, optimizer, FakeLoader(batch=4), fsdp=True)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    model, optimizer = tiny()
    save(tmp_path, 1, model, optimizer, FakeLoader(1))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save", full_disk)
    with pytest.raises(ValueError, match=r"writing the checkpoint of step 2 .* No space left on device; .* MB free "
                                         r"on that disk\); .*step_000001 is intact"):
        save(tmp_path, 2, model, optimizer, FakeLoader(2))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000001"]


def test_a_resume_keeps_the_flags_that_define_the_model(monkeypatch):
    args = {"model": "mini", "model_config": "", "init_from": "scratch", "copy_init": "auto", "optimizer": "adamw",
            "rope_scaling": ""}
    assert checkpoints.changed_model_flag("out/x", args, dict(args)) is None
    assert checkpoints.changed_model_flag("out/x", {**args, "copy_init": True}, {**args, "copy_init": "true"}) is None
    why = checkpoints.changed_model_flag("out/x", args, {**args, "model": "small"})
    assert why == "--model cannot change when resuming (the run in out/x used 'mini')"
    old = {k: v for k, v in args.items() if k != "rope_scaling"}  # a run saved before the flag existed
    assert checkpoints.changed_model_flag("out/x", old, args) is None
    why = checkpoints.changed_model_flag("o", old, {**args, "rope_scaling": "linear:2"})
    assert why.startswith("--rope-scaling cannot change")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert checkpoints.run_dir("out/sweep") == os.path.join("out/sweep", "r1")
    assert checkpoints.run_dir("out/sweep/r1") == "out/sweep/r1"
    monkeypatch.delenv("WANDB_SWEEP_ID")
    assert checkpoints.run_dir("out/sweep") == "out/sweep"


def test_metrics_on_resume_drop_what_came_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "tr')  # the last line torn by a crash
    m = Metrics(str(tmp_path), step=2, master=True)
    m.record({"step": 3, "train/loss": 0.25})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[-1]["train/loss"] == 0.25
    assert m.last == {"train/loss": 0.25}
    Metrics(str(tmp_path), step=0, master=False).record({"step": 9, "x": 1})  # only rank 0 writes
    assert len(path.read_text().splitlines()) == 3
    Metrics(str(tmp_path), step=0, master=True)  # a fresh run starts an empty file
    assert path.read_text() == ""


def test_the_first_signal_asks_for_a_save_the_second_stops(monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    said = []
    try:
        received = checkpoints.stop_on_signals(said.append)
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM] and "saving after this step" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
