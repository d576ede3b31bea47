"""train.py end to end on CPU: the loss falls, a resumed run equals an uninterrupted one, two
gloo ranks (DDP or FSDP2) equal one process with the same global batch, a sharded checkpoint
resumes on another number of ranks, Hugging Face init, W&B offline, and clear errors on bad
input. Each run is a subprocess, as a researcher would launch it."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
TWO_RANKS = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def tiny_run(shards, out, *extra):
    return ["--data=" + shards["train"], "--model=tiny", "--batch-size=2", "--out=" + str(out),
            "--wandb=disabled", "--lr=3e-3", "--dtype=float32", *extra]  # exact comparisons: no autocast


def train(*flags, check=True, launcher=(sys.executable,), env=()):
    p = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT, env={**ENV, **dict(env)},
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out, key="train/loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {e["step"]: e[key] for e in map(json.loads, f) if key in e}


def assert_same_curves(a, b, rel=1e-5, keys=("train/loss", "val/loss")):
    """Every step's training and validation loss (or other metrics) of run a equals run b's, to rel."""
    for key in keys:
        x, y = metrics(a, key), metrics(b, key)
        assert x.keys() == y.keys() and len(x) >= 2, (key, x, y)
        for s in x:
            assert abs(x[s] - y[s]) <= rel * abs(x[s]), (key, s, x[s], y[s])


@pytest.mark.slow
def test_loss_falls_and_checkpoints_load(calc_shards, tmp_path):
    out = tmp_path / "run"
    p = train(*tiny_run(calc_shards, out, "--max-steps=40", "--val-data=" + calc_shards["val"],
                        "--eval-every=20", "--keep=1"))
    assert "step 40/40" in p.stdout and "val loss" in p.stdout
    loss, val = metrics(out), metrics(out, "val/loss")
    assert sorted(loss) == list(range(1, 41)) and sorted(val) == [20, 40]
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (38, 39, 40)) / 3
    assert first > 5.0 and last < 0.5 * first, (first, last)  # ln(vocab 420) = 6.0 at the start
    assert val[40] < val[20] < first
    # the checkpoint is a loadable model; --keep=1 left only the last one
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000040"]
    assert open(out / "latest").read().strip() == "step_000040"
    ck = out / "step_000040"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 40 and meta["data"]["step"] == 40 and len(meta["rng"]) == 1
    assert (ck / "optim_rank0.pt").exists() and (ck / "tokenizer.model").exists()
    import torch
    from agentc.data.loader import Loader
    from agentc.model import checkpoint
    model = checkpoint.load(str(ck))
    b = Loader(calc_shards["val"], batch_size=4, shuffle=False).next_batch()
    with torch.no_grad():
        v = model(b.tokens, b.doc_offsets, b.targets, b.loss_weights) / b.loss_weights.sum()
    assert v.item() < first * 0.6


def saved_step(out):
    return json.loads((out / open(out / "latest").read().strip() / "meta.json").read_text())["step"]


@pytest.mark.slow
def test_resume_continues_the_same_curve(calc_shards, tmp_path):
    """Stopped mid-run by SIGTERM or by --max-time, the run saves and exits 0; `--resume` (with no
    other flag) finishes it, and every step's loss equals an uninterrupted run's exactly."""
    steps = "--max-steps=80"
    train(*tiny_run(calc_shards, tmp_path / "whole", steps, "--save-every=0"))
    whole = metrics(tmp_path / "whole")
    # SIGTERM once three steps are logged
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_run(calc_shards, out, steps, "--save-every=0")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "metrics.jsonl"
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "continue with --resume" in stdout, stdout
    assert 3 <= saved_step(out) < 80
    with open(log, "a") as f:
        f.write('{"step": 999, "train/lo')  # a line torn by a crash, and a step that never happened
    p = train("--out=" + str(out), "--resume")
    assert f"resuming {out}" in p.stdout and "flags changed" not in p.stdout
    assert metrics(out) == whole
    # --max-time: stops itself; the budget is not inherited by --resume
    out = tmp_path / "timed"
    p = train(*tiny_run(calc_shards, out, steps, "--save-every=0", "--max-time=0.5s"))
    assert "time budget spent" in p.stdout and 0 < saved_step(out) < 80
    train("--out=" + str(out), "--resume")
    assert metrics(out) == whole and saved_step(out) == 80
    # a finished run has nothing left to do; a fresh run may not overwrite it
    assert "nothing left to train" in train("--out=" + str(out), "--resume").stdout
    p = train(*tiny_run(calc_shards, out, steps), check=False)
    assert p.returncode != 0 and "already holds a run" in p.stderr


@pytest.mark.slow
def test_keep_deletes_only_older_checkpoints(calc_shards, tmp_path):
    out = tmp_path / "run"
    shape = "--model-config=dim=48,n_layers=1,n_heads=3,n_kv_heads=1,tie_embeddings=true"
    train(*tiny_run(calc_shards, out, "--max-steps=6", "--save-every=2", "--keep=2", shape))
    assert sorted(os.listdir(out)) == ["latest", "metrics.jsonl", "step_000004", "step_000006"]
    cfg = json.loads((out / "step_000006" / "config.json").read_text())["model"]  # the preset, as overridden
    assert (cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["tie_embeddings"]) == (48, 1, 3, 1, True)
    p = train("--out=" + str(out), "--resume", "--max-steps=8", "--model-config=dim=64", check=False)
    assert p.returncode != 0 and "--model-config cannot change when resuming" in p.stderr
    shutil.copytree(out / "step_000006", out / "step_000100")  # not this run's: left alone
    (out / "latest").write_text("step_000004\n")
    p = train("--out=" + str(out), "--resume", "--max-steps=8", "--keep=1", "--attn=reference", "--loss=fused")
    assert "attention: reference; loss: fused" in p.stdout  # backends swap on resume; the fused loss trains
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000008", "step_000100"]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_accumulation(calc_shards, tmp_path):
    """1 process x 4 micro-batches = 2 ranks x 2 micro-batches: same rows, same loss, same steps."""
    batch = ["--max-steps=4", "--total-batch-tokens=4096", "--val-data=" + calc_shards["val"], "--eval-every=2"]
    one = train(*tiny_run(calc_shards, tmp_path / "one", *batch))
    assert "2 rows x 4 accumulation x 1 ranks" in one.stdout
    two = train(*tiny_run(calc_shards, tmp_path / "two", *batch), launcher=TWO_RANKS)
    assert "2 rows x 2 accumulation x 2 ranks" in two.stdout
    assert_same_curves(tmp_path / "one", tmp_path / "two")
    ck = tmp_path / "two" / "step_000004"
    assert (ck / "optim_rank0.pt").exists() and (ck / "optim_rank1.pt").exists()


@pytest.mark.slow
def test_fsdp_equals_one_process_and_its_sharded_checkpoint_resumes_on_any_ranks(calc_shards, tmp_path):
    """FSDP2 on 2 gloo ranks, with gradient accumulation and selective activation checkpointing,
    trains the steps one plain process trains (float32, 1e-5), and its agent evaluation (split over
    the ranks, each with a gathered copy of the model) reports the same. Its checkpoint holds the whole
    model.safetensors and a sharded copy of model and optimizer (dcp/), and resumes mid-run on 2
    ranks with FSDP and on 1 process without: every later step as the uninterrupted run. The LM
    head is tied to the embedding, as in the 1b preset: one parameter in two roles, sharded once."""
    import torch
    from agentc.model import checkpoint
    batch = ["--max-steps=6", "--total-batch-tokens=4096", "--val-data=" + calc_shards["val"], "--eval-every=2",
             "--save-every=3", "--eval-episodes=3", "--model-config=tie_embeddings=true"]  # the 1b preset's tying
    train(*tiny_run(calc_shards, tmp_path / "one", *batch))
    p = train(*tiny_run(calc_shards, tmp_path / "fsdp", *batch, "--fsdp", "--activation-checkpointing=selective"),
              launcher=TWO_RANKS)
    assert "2 rows x 2 accumulation x 2 ranks" in p.stdout and "FSDP2" in p.stdout and "selective" in p.stdout
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp")
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp", keys=("eval/success_rate", "eval/mean_steps"))
    ck = tmp_path / "fsdp" / "step_000006"
    assert sorted(os.listdir(ck / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not [f for f in os.listdir(ck) if f.startswith("optim_rank")]
    recorded = json.loads((ck / "meta.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "model.safetensors"} <= recorded.keys()
    whole, fsdp = checkpoint.load(str(tmp_path / "one" / "step_000006")), checkpoint.load(str(ck))
    for (name, a), (_, b) in zip(whole.state_dict().items(), fsdp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    for where, launcher, flags in (("fsdp2", TWO_RANKS, []), ("single", (sys.executable,), ["--fsdp=false"])):
        out = tmp_path / where
        shutil.copytree(tmp_path / "fsdp", out)
        shutil.rmtree(out / "step_000006")
        (out / "latest").write_text("step_000003\n")
        p = train("--out=" + str(out), "--resume", *flags, launcher=launcher)
        assert f"resuming {out}/step_000003 at step 3" in p.stdout, p.stdout
        assert_same_curves(tmp_path / "one", out)
    # a checkpoint without the sharded copy (DDP's optim_rankR.pt) cannot continue under --fsdp
    p = train("--out=" + str(tmp_path / "one"), "--resume", "--max-steps=8", "--fsdp", check=False)
    assert p.returncode != 0 and "written without --fsdp" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_fsdp_runs_the_fused_loss(calc_shards, tmp_path):
    """FSDP2 with the fused LM-head loss (Triton's interpreter on a CPU), which reads the whole
    output weight the root gathers, trains the steps one process trains with it."""
    flags = ["--max-steps=2", "--batch-size=1", "--total-batch-tokens=1024", "--loss=fused", "--eval-episodes=0"]
    env = {"TRITON_INTERPRET": "1"}
    train(*tiny_run(calc_shards, tmp_path / "one", *flags), env=env)
    p = train(*tiny_run(calc_shards, tmp_path / "fsdp", *flags, "--fsdp"), launcher=TWO_RANKS, env=env)
    assert "loss: fused" in p.stdout
    assert_same_curves(tmp_path / "one", tmp_path / "fsdp", keys=("train/loss",))


@pytest.mark.slow
def test_evaluation_split_over_two_ranks_equals_one_process(calc_shards, tmp_path):
    """torchrun infer.py --eval: each rank runs every other episode, rank 0 gathers them. Sampled
    episodes (temperature 1, two attempts a task) give the traces, in the same order, and the
    summary one process gives; only the timings differ."""
    train(*tiny_run(calc_shards, tmp_path / "agent", "--max-steps=2", "--eval-episodes=0"))
    flags = ["infer.py", f"--agent={tmp_path / 'agent'}", "--eval", "--episodes=5", "--temperature=1.0", "--pass-k=2",
             "--max-steps=3", "--max-new-tokens=16", "--quant=fp32"]
    runs = {}
    for name, launcher in (("one", (sys.executable,)), ("two", TWO_RANKS)):
        p = subprocess.run([*launcher, *flags, f"--out={tmp_path / name}.json", f"--traces={tmp_path / name}.jsonl"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("wrote ") == 1  # rank 0 reports
        traces = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        for t in traces:
            for key in ("stats", "steps"):  # timings inside
                t.pop(key)
        runs[name] = (traces, json.loads((tmp_path / f"{name}.json").read_text()))
    (t1, s1), (t2, s2) = runs["one"], runs["two"]
    assert len(t1) == 10 and t1 == t2 and [t["repeat"] for t in t2] == [0] * 5 + [1] * 5
    assert len({tuple(t["ids"]) for t in t1}) == 10  # sampled: every episode its own
    timing = {"mean_step_latency_s", "p95_step_latency_s", "decode_tokens_per_s", "wall_s", "episodes_per_min",
              "decode_tokens_per_s_wall", "ranks"}
    assert {k: v for k, v in s1.items() if k not in timing} == {k: v for k, v in s2.items() if k not in timing}
    assert (s1["ranks"], s2["ranks"]) == (1, 2)
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # the ranks' parts were merged and removed
    # fewer episodes than ranks: rank 1 has none and waits for rank 0's
    p = subprocess.run([*TWO_RANKS, *flags[:3], "--episodes=1", "--max-steps=2", "--max-new-tokens=8",
                        f"--out={tmp_path / 'few'}.json"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and json.loads((tmp_path / "few.json").read_text())["episodes"] == 1, p.stderr[-3000:]


@pytest.mark.slow
def test_long_context_recipe_stretches_rotary_positions(calc_corpus, calc_shards, tmp_path):
    """A model trained on 512-token rows continues on rows of 2,048 (four times its context):
    without --rope-scaling train.py warns; with llama3:4 the slow rotary pairs turn four times
    slower, the checkpoint's config says so (original context 512, now 2,048), and it trains
    under activation checkpointing to a finite loss."""
    import torch
    from agentc.data import pack
    from agentc.model import checkpoint
    from agentc.model.transformer import rope_frequencies
    long = tmp_path / "long"
    pack.main([calc_corpus["jsonl"], "--tokenizer", calc_corpus["tokenizer"], "--seq-len", "2048", "--out", str(long),
               "--quiet"])
    train(*tiny_run(calc_shards, tmp_path / "base", "--max-steps=2", "--eval-episodes=0"))
    flags = ["--data=" + str(long), "--init-from=" + str(tmp_path / "base"), "--batch-size=1", "--max-steps=2",
             "--wandb=disabled", "--dtype=float32", "--eval-episodes=0"]
    p = train(*flags, "--out=" + str(tmp_path / "plain"))
    assert "WARNING: rows of 2048 tokens are longer than the 512 the model was trained for" in p.stdout
    p = train(*flags, "--out=" + str(tmp_path / "stretched"), "--rope-scaling=llama3:4",
              "--activation-checkpointing=selective")
    assert "rotary positions scaled" in p.stdout and "WARNING" not in p.stdout
    cfg = json.loads((tmp_path / "stretched" / "step_000002" / "config.json").read_text())["model"]
    assert cfg["rope_scaling"] == {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_seq_len": 512} and cfg["max_seq_len"] == 2048
    assert all(math.isfinite(v) for v in metrics(tmp_path / "stretched").values())
    base, stretched = (checkpoint.load(str(tmp_path / d / "step_000002")).cfg for d in ("base", "stretched"))
    f0, f1 = rope_frequencies(base), rope_frequencies(stretched)
    assert torch.equal(f1[0], f0[0]) and torch.allclose(f1[-1], f0[-1] / 4)  # fast pairs kept, slow ones stretched


@pytest.mark.slow
def test_init_from_hugging_face_resizes_the_vocabulary(calc_shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    hf.save_pretrained(tmp_path / "hf")
    p = train(*tiny_run(calc_shards, tmp_path / "run", "--max-steps=2", "--init-from=" + str(tmp_path / "hf")))
    assert f"from 300 to {calc_shards['vocab_size']}" in p.stdout
    from agentc.model import checkpoint
    model = checkpoint.load(str(tmp_path / "run" / "step_000002"))
    assert model.cfg.vocab_size == calc_shards["vocab_size"] and model.cfg.dim == 64


@pytest.mark.slow
def test_wandb_offline_run_is_written(calc_shards, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    flags = [f for f in tiny_run(calc_shards, out, "--max-steps=2") if not f.startswith("--wandb")]
    p = subprocess.run([sys.executable, "train.py", *flags, "--wandb=offline"], cwd=ROOT,
                       env={**{k: v for k, v in ENV.items() if k != "WANDB_MODE"}, "WANDB_SILENT": "true"},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and os.listdir(out / "wandb" / runs[0])


@pytest.mark.slow
def test_sweep_config_drives_train_py(calc_shards, tmp_path):
    """Every parameter of the sweep is a train.py flag, passed as the agent passes it (--key=value),
    and each run of the sweep gets its own directory."""
    sweep = yaml.safe_load(open(os.path.join(ROOT, "experiments/sweeps/lr_size.yaml")))
    assert sweep["program"] == "train.py" and sweep["metric"]["name"] == "val/loss"
    params = {k: (v["values"][0] if "values" in v else v["value"]) for k, v in sweep["parameters"].items()}
    assert {"lr", "model"} <= params.keys() and len(sweep["parameters"]["model"]["values"]) > 1
    params.update(data=calc_shards["train"], val_data=calc_shards["val"], out=str(tmp_path), wandb="disabled",
                  model="tiny", max_steps=1)
    p = train(*[f"--{k}={v}" for k, v in params.items()], env={"WANDB_SWEEP_ID": "sw", "WANDB_RUN_ID": "r1"})
    assert "step 1/1" in p.stdout and (tmp_path / "r1" / "latest").exists()


# a flag added to a good run, and the line it must bring
BAD_FLAGS = {
    "unknown flag": (["--learning_rate=0.1"], "unrecognized arguments: --learning_rate=0.1"),
    "batch not divisible": (["--total-batch-tokens=1000"], "not a multiple of batch-size x seq-len x ranks"),
    "bad model config": (["--model-config=dim=64,layers=3"], "is not a ModelConfig field it can set"),
    "batch of 0": (["--batch-size=0"], "--batch-size must be at least 1"),
    "triton without GPU": (["--attn=triton"], "--attn=triton needs a CUDA device"),
    "muon under fsdp": (["--fsdp", "--optimizer=muon"], "--optimizer=muon needs whole matrices"),
    "bad rope scaling": (["--rope-scaling=cubic:2"], "--rope-scaling=cubic:2: expected linear:F or llama3:F"),
    "unknown checkpointing": (["--activation-checkpointing=all"],
                              "invalid choice: 'all' (choose from 'none', 'block', 'selective')"),
}


# a process each (seconds on 2 cores): one case in the default run proves the real entry point's
# one-line error; the rest in -m slow. tests/test_errors.py (TRAIN_CASES) runs the same errors but
# "bad header" (test_pack's) and "triton without GPU" (it needs TRITON_INTERPRET unset at import) in-process
@pytest.mark.parametrize("case", ["missing shard", *(pytest.param(c, marks=pytest.mark.slow)
                                                     for c in ["bad header", "no init checkpoint", *BAD_FLAGS])])
def test_bad_inputs_give_clear_errors(calc_shards, tmp_path, case):
    data = tmp_path / "data"
    flags = tiny_run(calc_shards, tmp_path / "run", "--max-steps=1")
    if case == "missing shard":
        flags[0] = f"--data={data / 'nowhere'}"
        expect = "nowhere"
    elif case == "bad header":
        for f in os.listdir(os.path.dirname(calc_shards["train"])):
            if f.startswith("train"):
                shutil.copy(os.path.join(os.path.dirname(calc_shards["train"]), f), tmp_path / f)
        with open(tmp_path / "train_000.bin", "r+b") as f:
            f.write(b"NOTTOKS\0")
        flags[0] = f"--data={tmp_path / 'train'}"
        expect = "bad magic"
    elif case == "no init checkpoint":
        flags.append(f"--init-from={tmp_path / 'nowhere'}")
        expect = "nowhere"
    else:
        extra, expect = BAD_FLAGS[case]
        flags += extra
    env = {"TRITON_INTERPRET": "0"} if case == "triton without GPU" else {}
    p = train(*flags, check=False, env=env)
    assert p.returncode != 0 and expect in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
