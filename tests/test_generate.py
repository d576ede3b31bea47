"""python -m agentc.data.generate: format, determinism across workers and shards, rejects, resume."""
import json
import os
import subprocess
import sys

import pytest

from agentc.data import generate
from agentc.data.format import render
from tests.fake_workflow import CalcWorkflow
from agentc.workflows.base import Call

ARGS = ["--workflow", "tests.fake_workflow", "--split", "train", "--quiet"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    stats = generate.main(ARGS + ["--out", out, *map(str, extra)])
    return out, stats, open(out).read().splitlines()


def test_output_format_and_reject_accounting(tmp_path, calc_corpus):
    out, stats, lines = run(tmp_path, "a.jsonl", "--n", 60, "--workers", 1)
    records = [json.loads(x) for x in lines]
    assert stats["kept"] == len(records) and stats["kept"] + stats["lost_tasks"] == 60
    rejects = [json.loads(x) for x in open(out + ".rejects.jsonl")]
    assert stats["rejected_attempts"] == len(rejects) > 0
    # the fake teacher fails two ways on purpose; both are counted under their kind
    assert set(stats["reject_kinds"]) == {"tool_crash", "checker"}
    assert {r["reason"] for r in rejects if r["kind"] == "checker"} == {"wrong sum"}
    assert json.load(open(out + ".stats.json")) == stats
    wf = CalcWorkflow()
    for rec in records:
        assert set(rec) == {"messages", "tools", "meta"}
        meta = rec["meta"]
        assert {"workflow", "task_id", "split", "seed", "success"} <= set(meta)
        assert meta["success"] is True and meta["workflow"] == "calc" and meta["split"] == "train"
        assert [t["function"]["name"] for t in rec["tools"]] == ["add", "broken"]
        # the record reproduces its task, and its answer passes the checker
        task = wf.sample_task("train", meta["index"], meta["seed"])
        assert task.id == meta["task_id"]
        assert wf.check(task, None, rec["messages"][-1]["content"]).ok
        assert all(m["role"] != "tool" or not m["content"].startswith("Error: internal") for m in rec["messages"])
        render(rec, calc_corpus["tok"])
    assert [r["meta"]["index"] for r in records] == sorted(r["meta"]["index"] for r in records)


def test_deterministic_whatever_the_workers(tmp_path):
    _, _, one = run(tmp_path, "w1.jsonl", "--n", 80, "--workers", 1)
    _, _, two = run(tmp_path, "w2.jsonl", "--n", 80, "--workers", 2)
    _, _, other = run(tmp_path, "s1.jsonl", "--n", 80, "--workers", 2, "--seed", 1)
    assert one == two and one != other


def test_fault_rate_reaches_the_teacher(tmp_path):
    """--fault-rate: transient errors appear in the tool messages, and as many tasks are kept as
    without them (the fake workflow rejects a few on purpose either way)."""
    from agentc.workflows.base import TRANSIENT_FAULTS
    _, _, lines = run(tmp_path, "f.jsonl", "--n", 40, "--workers", 2, "--fault-rate", 0.3)
    _, _, plain = run(tmp_path, "p.jsonl", "--n", 40, "--workers", 2)
    texts = {t for t, _ in TRANSIENT_FAULTS}
    faults = sum(m.get("content") in texts for line in lines for m in json.loads(line)["messages"])
    assert len(lines) == len(plain) and faults > 5


def test_shards_partition_the_set(tmp_path):
    _, _, full = run(tmp_path, "full.jsonl", "--n", 50, "--workers", 1)
    _, _, a = run(tmp_path, "a.jsonl", "--n", 50, "--workers", 1, "--shard", "0/2")
    _, _, b = run(tmp_path, "b.jsonl", "--n", 50, "--workers", 1, "--shard", "1/2")
    assert sorted(a + b) == sorted(full) and not set(a) & set(b)
    assert {json.loads(x)["meta"]["index"] % 2 for x in a} == {0}


def test_resume_after_a_crash(tmp_path):
    out, _, full = run(tmp_path, "full.jsonl", "--n", 40, "--workers", 1)
    rejects = open(out + ".rejects.jsonl").read().splitlines()
    # what a crash after the 10th kept record leaves behind, with a torn last line
    crashed = str(tmp_path / "crashed.jsonl")
    last = json.loads(full[9])["meta"]["index"]
    with open(crashed + ".partial", "w") as f:
        f.write("\n".join(full[:10]) + "\n" + full[10][:50])
    with open(crashed + ".rejects.jsonl", "w") as f:
        f.write("".join(r + "\n" for r in rejects if json.loads(r)["index"] <= last))
    with open(crashed + ".partial.run", "w") as f:  # what the crashed run recorded at its start
        json.dump({"workflow": "tests.fake_workflow", "split": "train", "n": 40, "seed": 0, "shard": "0/1",
                   "max_attempts": 4, "test_share": 0.3, "heldout_template_share": 0.25}, f)
    with pytest.raises(SystemExit, match="different run"):  # other arguments cannot continue this file
        generate.main(ARGS + ["--out", crashed, "--n", "40", "--workers", "1", "--resume", "--seed", "3"])
    stats = generate.main(ARGS + ["--out", crashed, "--n", "40", "--workers", "1", "--resume"])
    assert open(crashed).read().splitlines() == full
    assert open(crashed + ".rejects.jsonl").read().splitlines() == rejects
    assert stats["kept"] == len(full) and stats["lost_tasks"] == json.load(open(out + ".stats.json"))["lost_tasks"]
    assert not os.path.exists(crashed + ".partial.run")


def test_a_teacher_bug_fails_loudly(tmp_path, capsys):
    out = str(tmp_path / "bug.jsonl")
    with pytest.raises(SystemExit, match="no trajectory was accepted"):
        generate.main(["--workflow", "tests.test_generate", "--split", "train", "--n", "3", "--out", out,
                       "--workers", "1", "--quiet", "--max-attempts", "1"])
    assert "bug in the workflow" in capsys.readouterr().err
    (first, *_) = [json.loads(x) for x in open(out + ".rejects.jsonl")]
    assert first["kind"] == "teacher_error" and "ZeroDivisionError" in first["traceback"]


class BuggyWorkflow(CalcWorkflow):
    def teacher(self, task, env):
        yield Call("add", {"a": 1, "b": 1 // 0})


WORKFLOW = BuggyWorkflow  # lets --workflow tests.test_generate load the buggy teacher above


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no workflow named"):
        generate.main(["--workflow", "nope", "--split", "train", "--n", "1", "--out", str(tmp_path / "x")])
    for bad in (["--shard", "2/2"], ["--shard", "x"], ["--split", "val"], ["--n", "0"]):
        args = ARGS + ["--n", "3", "--out", str(tmp_path / "x.jsonl")] + bad
        with pytest.raises(SystemExit):
            generate.main(args)


def test_module_entry_point(tmp_path):
    out = tmp_path / "cli.jsonl"
    p = subprocess.run([sys.executable, "-m", "agentc.data.generate", *ARGS, "--n", "5", "--out", str(out)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 0, p.stderr
    assert "trajectories kept" in p.stdout and out.exists()
