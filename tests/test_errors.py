"""Every command turns a bad input (missing, empty, truncated, corrupted or wrongly-typed files,
bad flag values) into one line on stderr that names the file or flag, a non-zero exit status and
no traceback; --debug shows the traceback instead (agentc/util.py: run_main, report_errors).

Most cases call a command's main(argv) in this process, through the same wrapper its
`python -m` entry point uses; train.py, a flat script, runs in this process with runpy. A few
subprocesses prove the real entry points."""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import pytest

import infer
from agentc.data import audit, bpe, generate, importers, pack, tokenizer
from agentc.runtime import export
from agentc.util import error_line, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
COMMANDS = {"generate": generate.main, "tokenizer": tokenizer.main, "pack": pack.main, "audit": audit.main,
            "import": importers.main, "bpe": bpe.main, "infer": infer.main, "export": export.main}


def one_line_error(code, err: str, expect: str) -> str:
    """The checks every case makes; returns the error line."""
    assert code not in (0, None), f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert expect in lines[0], f"{expect!r} not in {err!r}"
    return lines[0]


def run_command(capsys, name: str, argv: list[str]):
    """(exit status, stderr) of `python -m ...` NAME ARGV, run in this process. A SystemExit
    message is printed to stderr the way Python does at the top level."""
    capsys.readouterr()
    try:
        run_main(COMMANDS[name], name, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = exit_status(e)
    return code, capsys.readouterr().err


def exit_status(e: SystemExit) -> int:
    """What Python makes of SystemExit at the top level: a message goes to stderr, status 1."""
    if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        return 1
    return e.code


def run_train(capsys, monkeypatch, flags: list[str]):
    """(exit status, stderr) of `python train.py FLAGS`, run in this process: the exception that
    ends the script goes to the hook train.py installed, as it would at the top of a process."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, flags)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # train.py's Ctrl-C handler stays out of pytest
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = exit_status(e)
    except Exception as e:
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    return code, capsys.readouterr().err


def put(path, content) -> str:
    """Write `content` (bytes, or text) to `path`; returns the path as a string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return str(path)


def cut(path, keep=0.5) -> str:
    """Truncate the file at `path` to a share of its bytes."""
    with open(path, "rb") as f:
        data = f.read()
    return put(path, data[:int(len(data) * keep)])


def damaged_run(run, tmp_path, name, damage) -> tuple[str, str]:
    """A copy of the run (trained_run, tests/conftest.py) whose checkpoint file `name` is damaged:
    (run dir, checkpoint dir)."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    ck = out / run["step"]
    if damage == "truncate":
        cut(ck / name)
    else:
        put(ck / name, damage)
    return str(out), str(ck)


# ----------------------------------------------------------------------------- the data commands

def jsonl(tmp_path, text, name="in.jsonl"):
    return put(tmp_path / name, text)


GEN = ["--split", "train", "--n", "3", "--workers", "1", "--quiet"]
TEXT = "this is a plain text file\nnot JSON lines\n"
BINARY = b"\xff\xfe\x00\x01garbage\x80\n"


def crashed_run(t) -> str:
    """The --out of a generate run that crashed, leaving a corrupt OUT.partial.run behind."""
    put(t / "x.jsonl.partial", "")
    put(t / "x.jsonl.partial.run", "{oops")
    return str(t / "x.jsonl")


def shard_copy(prefix, t, damage) -> str:
    """A copy of the first shard of `prefix` as t/x_000, its .bin truncated or replaced by `damage`."""
    shutil.copy(prefix + "_000.idx", t / "x_000.idx")
    shutil.copy(prefix + "_000.bin", t / "x_000.bin")
    if damage == "truncate":
        cut(t / "x_000.bin")
    else:
        put(t / "x_000.bin", damage)
    return str(t / "x_000")


def data_cases():
    """name -> (command, argv(corpus, shards, tmp_path), what the line must name)."""
    calc = "tests.fake_workflow"
    return {
        "generate: unknown --workflow": (
            "generate", lambda c, s, t: ["--workflow", "nosuch", *GEN, "--out", t / "x.jsonl"], "--workflow nosuch"),
        "generate: negative --n": (
            "generate", lambda c, s, t: ["--workflow", calc, *GEN, "--n", "-2", "--out", t / "x.jsonl"], "--n"),
        "generate: non-numeric --n": (
            "generate", lambda c, s, t: ["--workflow", calc, *GEN, "--n", "many", "--out", t / "x.jsonl"], "--n"),
        "generate: --out is a directory": (
            "generate", lambda c, s, t: ["--workflow", calc, *GEN, "--out", t], "--out"),
        "generate: --mistake-rate above 1": (
            "generate", lambda c, s, t: ["--workflow", calc, *GEN, "--mistake-rate", "1.5", "--out", t / "x.jsonl"],
            "--mistake-rate"),
        "generate: --resume over a corrupt run file": (
            "generate", lambda c, s, t: ["--workflow", calc, *GEN, "--resume", "--out", crashed_run(t)],
            "x.jsonl.partial.run"),
        "tokenizer: empty input": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", jsonl(t, "")], "in.jsonl"),
        "tokenizer: plain text input": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", jsonl(t, TEXT)], "in.jsonl:1"),
        "tokenizer: a record that is a list": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", jsonl(t, '{"messages": []}\n[1, 2]\n')],
            "in.jsonl:2"),
        "tokenizer: binary input": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", jsonl(t, BINARY)], "in.jsonl"),
        "tokenizer: missing input": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", t / "missing.jsonl"], "missing.jsonl"),
        "tokenizer: a directory as input": (
            "tokenizer", lambda c, s, t: ["train", "--out", t / "tok", put(t / "d" / "x", "") and t / "d"], "/d"),
        "tokenizer: negative --vocab-size": (
            "tokenizer", lambda c, s, t: ["train", "--vocab-size", "-5", "--out", t / "tok", c["jsonl"]],
            "--vocab-size"),
        "tokenizer: truncated model": (
            "tokenizer", lambda c, s, t: ["encode", cut(shutil.copy(c["tokenizer"], t / "tok.model")), "hi"],
            "tok.model"),
        "tokenizer: extend a text file": (
            "tokenizer", lambda c, s, t: ["extend", jsonl(t, TEXT, "base.model"), t / "out.model"], "base.model"),
        "pack: missing --tokenizer": (
            "pack", lambda c, s, t: [c["jsonl"], "--tokenizer", t / "nope.model", "--seq-len", 64, "--out", t / "p"],
            "--tokenizer"),
        "pack: --tokenizer is a JSONL file": (
            "pack", lambda c, s, t: [c["jsonl"], "--tokenizer", c["jsonl"], "--seq-len", 64, "--out", t / "p"],
            "--tokenizer"),
        "pack: missing input": (
            "pack", lambda c, s, t: [t / "gone.jsonl", "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out",
                                     t / "p"], "gone.jsonl"),
        "pack: a directory as input": (
            "pack", lambda c, s, t: [t, "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out", t / "p"],
            "a directory"),
        "pack: plain text input": (
            "pack", lambda c, s, t: [jsonl(t, TEXT), "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out", t / "p",
                                     "--quiet", "--workers", 1], "in.jsonl:1"),
        "pack: empty input": (
            "pack", lambda c, s, t: [jsonl(t, ""), "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out", t / "p"],
            "in.jsonl"),
        "pack: binary input": (
            "pack", lambda c, s, t: [jsonl(t, BINARY), "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out",
                                     t / "p"], "in.jsonl"),
        "pack: negative --seq-len": (
            "pack", lambda c, s, t: [c["jsonl"], "--tokenizer", c["tokenizer"], "--seq-len", -4, "--out", t / "p"],
            "--seq-len"),
        "pack: non-numeric --seq-len": (
            "pack", lambda c, s, t: [c["jsonl"], "--tokenizer", c["tokenizer"], "--seq-len", "long", "--out", t / "p"],
            "--seq-len"),
        "pack: negative --weight": (
            "pack", lambda c, s, t: [c["jsonl"], "--tokenizer", c["tokenizer"], "--seq-len", 64, "--out", t / "p",
                                     "--weight", "calc=-1"], "--weight"),
        "audit: the summary is a JSON list": (
            "audit", lambda c, s, t: [put(t / "train.json", "[1, 2]")[:-5]], "train.json"),
        "audit: a text file where a shard is expected": (
            "audit", lambda c, s, t: [shard_copy(s, t, TEXT * 10)], "x_000.bin"),
        "audit: truncated shard": ("audit", lambda c, s, t: [shard_copy(s, t, "truncate")], "x_000.bin"),
        "audit: missing shards": ("audit", lambda c, s, t: [t / "nothing"], "nothing"),
        "audit: negative --show": ("audit", lambda c, s, t: ["--show", -1, s], "--show"),
        "import: missing input": (
            "import", lambda c, s, t: ["--format", "openai", t / "gone.json", t / "o.jsonl"], "gone.json"),
        "import: binary input": (
            "import", lambda c, s, t: ["--format", "openai", jsonl(t, BINARY), t / "o.jsonl"], "in.jsonl"),
        "import: empty input": (
            "import", lambda c, s, t: ["--format", "openai", jsonl(t, ""), t / "o.jsonl"], "in.jsonl"),
        "import: a JSON array cut short": (
            "import", lambda c, s, t: ["--format", "openai", jsonl(t, '[{"messages": [', "a.json"), t / "o.jsonl"],
            "a.json"),
        "bpe: a text file as GGUF": (
            "bpe", lambda c, s, t: ["from-gguf", put(t / "m.gguf", TEXT * 4), t / "o.bpe.json"], "m.gguf"),
        "bpe: an empty GGUF": (
            "bpe", lambda c, s, t: ["from-gguf", put(t / "m.gguf", b""), t / "o.bpe.json"], "m.gguf"),
        "bpe: a tokenizer file that is a JSON list": (
            "bpe", lambda c, s, t: ["encode", put(t / "t.bpe.json", "[1]"), "hi"], "t.bpe.json"),
    }


DATA = data_cases()


@pytest.mark.parametrize("case", list(DATA))
def test_data_command_errors(case, calc_corpus, calc_shards, tmp_path, capsys):
    command, argv, expect = DATA[case]
    code, err = run_command(capsys, command, argv(calc_corpus, calc_shards["train"], tmp_path))
    one_line_error(code, err, expect)


# ----------------------------------------------------------------------------- the runtime and train.py

AGENT_CASES = {  # name -> (checkpoint file, its damage, what the line must name)
    "truncated model.safetensors": ("model.safetensors", "truncate", "model.safetensors"),
    "text as model.safetensors": ("model.safetensors", TEXT, "model.safetensors"),
    "empty agent.json": ("agent.json", "", "agent.json"),
    "broken agent.json": ("agent.json", "{\n", "agent.json"),
    "agent.json is a list": ("agent.json", "[]", "agent.json"),
    "config.json is not a config": ("config.json", '{"format": "agentc", "model": {"layers": 2}}', "config.json"),
    "truncated tokenizer.model": ("tokenizer.model", "truncate", "tokenizer.model"),
}


@pytest.mark.parametrize("case", list(AGENT_CASES))
def test_infer_names_the_damaged_file(case, trained_run, tmp_path, capsys):
    name, damage, expect = AGENT_CASES[case]
    out, _ = damaged_run(trained_run, tmp_path, name, damage)
    code, err = run_command(capsys, "infer", ["--agent", out, "--task", "What is 2 + 2?", "--max-new-tokens", 4])
    one_line_error(code, err, expect)


@pytest.mark.parametrize("flags, expect", [
    (["--episodes", "-1"], "--episodes"), (["--top-p", "high"], "--top-p"), (["--max-len", "0"], "--max-len"),
    (["--agent", "nowhere"], "nowhere"), (["--device", "tpu"], "--device"), (["--workflow", "chess"], "chess"),
    (["--batch", "0"], "--batch"), (["--batch", "4", "--workers", "2"], "--workers"),
    (["--mode", "reprefill"], "--mode"), (["--quant", "int3"], "--quant"), (["--pass-k", "4"], "--pass-k"),
    (["--pass-k", "0", "--temperature", "1"], "--pass-k"),
])
def test_infer_flags(flags, expect, trained_run, capsys):
    code, err = run_command(capsys, "infer", ["--agent", trained_run["out"], "--eval", *flags])
    one_line_error(code, err, expect)


def test_infer_latest_naming_a_missing_checkpoint(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run["out"], out)
    put(out / "latest", "step_999999\n")
    code, err = run_command(capsys, "infer", ["--agent", out, "--eval"])
    one_line_error(code, err, "latest")


@pytest.mark.parametrize("case", ["truncated weights", "--gguf is a directory", "missing agent"])
def test_export_errors(case, trained_run, tmp_path, capsys):
    if case == "truncated weights":
        agent, _ = damaged_run(trained_run, tmp_path, "model.safetensors", "truncate")
        argv, expect = [agent, "--gguf", tmp_path / "a.gguf"], "model.safetensors"
    elif case == "--gguf is a directory":
        argv, expect = [trained_run["out"], "--gguf", tmp_path], "--gguf"
    else:
        argv, expect = [tmp_path / "nowhere", "--hf", tmp_path / "hf"], "nowhere"
    code, err = run_command(capsys, "export", argv)
    one_line_error(code, err, expect)


TRAIN_CASES = {  # name -> (checkpoint file to damage or None, its damage, extra flags, what the line must name)
    "--resume, truncated model.safetensors": ("model.safetensors", "truncate", [], "model.safetensors"),
    "--resume, broken meta.json": ("meta.json", '{"step": 1,', [], "meta.json"),
    "--resume, meta.json is a list": ("meta.json", "[]", [], "meta.json"),
    "--resume, truncated optimizer state": ("optim_rank0.pt", "truncate", [], "optim_rank0.pt"),
    "negative --max-steps": (None, None, ["--max-steps=-3"], "--max-steps"),
    "non-numeric --lr": (None, None, ["--lr=fast"], "--lr"),
    "unknown --device": (None, None, ["--device=tpu"], "--device"),
    "--data is a JSONL file": (None, None, ["--data={jsonl}"], "train.jsonl"),
    "--data summary is a JSON list": (None, None, ["--data={list}"], "list.json"),
    "--init-from a truncated checkpoint": (None, None, ["--init-from={cut}"], "model.safetensors"),
    "--init-from nowhere": (None, None, ["--init-from={nowhere}"], "nowhere"),
    "unknown --model-config field": (None, None, ["--model-config=dim=64,layers=3"], "is not a ModelConfig field"),
    "bad --rope-scaling": (None, None, ["--rope-scaling=cubic:2"], "--rope-scaling=cubic:2: expected linear:F"),
    "--fsdp with muon": (None, None, ["--fsdp", "--optimizer=muon"], "--optimizer=muon needs whole matrices"),
    "batch not divisible": (None, None, ["--total-batch-tokens=1000"], "not a multiple of batch-size x seq-len"),
    "--batch-size 0": (None, None, ["--batch-size=0"], "--batch-size must be at least 1"),
    "--warmup-frac 2": (None, None, ["--warmup-frac=2"], "--warmup-frac must be between 0 and 1"),
    "--resume changes --model": ("meta.json", None, ["--model=mini"], "--model cannot change when resuming"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_errors(case, trained_run, calc_corpus, tmp_path, capsys, monkeypatch):
    name, damage, extra, expect = TRAIN_CASES[case]
    if name:
        out, _ = damaged_run(trained_run, tmp_path, name, damage) if damage else (tmp_path / "run", None)
        if not damage:  # an intact copy
            shutil.copytree(trained_run["out"], out)
        flags = [f"--out={out}", "--resume", "--max-steps=2", *extra]
    else:
        paths = {"jsonl": calc_corpus["jsonl"], "list": put(tmp_path / "list.json", "[]")[:-5],
                 "nowhere": tmp_path / "nowhere"}
        if "{cut}" in extra[0]:
            paths["cut"] = damaged_run(trained_run, tmp_path, "model.safetensors", "truncate")[1]
        flags = [f"--data={trained_run['shards']}", "--model=tiny", "--batch-size=2", "--max-steps=1",
                 "--eval-episodes=0", "--wandb=disabled", f"--out={tmp_path / 'new'}",
                 *(f.format(**paths) for f in extra)]
    code, err = run_train(capsys, monkeypatch, flags)
    one_line_error(code, err, expect)


# ----------------------------------------------------------------------------- the wrapper itself

def test_debug_shows_the_traceback(trained_run, tmp_path, capsys):
    with pytest.raises(ValueError, match="--workflow nosuch"):  # in this process: the exception itself
        run_main(generate.main, "generate", ["--workflow", "nosuch", *GEN, "--out", str(tmp_path / "x"), "--debug"])
    # a message the command made of an exception comes after that exception's traceback
    out, _ = damaged_run(trained_run, tmp_path, "model.safetensors", "truncate")
    code, err = run_command(capsys, "infer", ["--agent", out, "--task", "2 + 2?", "--debug"])
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("infer.py: ")
    p = subprocess.run([sys.executable, "-m", "agentc.data.generate", "--workflow", "nosuch", *GEN, "--out",
                        str(tmp_path / "x.jsonl"), "--debug"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr and "no workflow named 'nosuch'" in p.stderr


def test_interrupt_and_unexpected_errors_are_one_line(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def buggy(argv):
        return {}["missing"]
    with pytest.raises(SystemExit) as e:
        run_main(interrupted, "cmd", [])
    assert e.value.code == 130 and capsys.readouterr().err == "cmd: interrupted\n"
    with pytest.raises(SystemExit) as e:
        run_main(buggy, "cmd", [])
    assert e.value.code == 1 and capsys.readouterr().err == "cmd: KeyError: 'missing'\n"
    assert error_line(FileNotFoundError(2, "No such file or directory", "a/b.json")) == \
        "a/b.json: No such file or directory"


ENTRY_POINTS = {  # the real `python -m` entry points on the failures they used to show a traceback for
    "generate, unknown workflow": (["agentc.data.generate", "--workflow", "nosuch", *GEN, "--out", "{tmp}/x.jsonl"],
                                   "--workflow nosuch"),
    "tokenizer, empty file": (["agentc.data.tokenizer", "train", "--out", "{tmp}/tok", "{empty}"], "{empty}"),
    "pack, missing tokenizer": (["agentc.data.pack", "{jsonl}", "--tokenizer", "{tmp}/no.model", "--seq-len", "64",
                                 "--out", "{tmp}/p"], "--tokenizer"),
}


@pytest.mark.parametrize("case", list(ENTRY_POINTS))
def test_entry_points(case, calc_corpus, tmp_path):
    paths = {"tmp": tmp_path, "empty": jsonl(tmp_path, ""), "jsonl": calc_corpus["jsonl"]}
    argv, expect = ENTRY_POINTS[case]
    p = subprocess.run([sys.executable, "-m", *(str(a).format(**paths) for a in argv)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    one_line_error(p.returncode, p.stderr, expect.format(**paths))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_scripts_entry_points(script, trained_run, tmp_path):
    """train.py --resume and infer.py on a truncated model.safetensors, as real processes (the
    checkpoint's meta.json without checksums, as older runs wrote it, so the weights are read);
    --debug gives train.py's traceback."""
    out, ck = damaged_run(trained_run, tmp_path, "model.safetensors", "truncate")
    with open(os.path.join(ck, "meta.json")) as f:
        meta = json.load(f)
    meta.pop("files", None)
    put(os.path.join(ck, "meta.json"), json.dumps(meta))
    argv = {"train.py": ["train.py", f"--out={out}", "--resume", "--max-steps=2"],
            "infer.py": ["infer.py", "--agent", out, "--task", "What is 2 + 2?"]}[script]
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    one_line_error(p.returncode, p.stderr, os.path.join(ck, "model.safetensors"))
    p = subprocess.run([sys.executable, *argv, "--debug"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0 and "Traceback" in p.stderr and "model.safetensors" in p.stderr
