"""Several workflows in one agent: agentc.data.pack --weight sets each workflow's share, train.py's agent
evaluation reports success per workflow, and infer.py --workflow all evaluates each of them."""
import json

import pytest

from agentc.data import generate, pack, tokenizer


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixture")
    paths = []
    for workflow, n in (("tests.fake_workflow", 60), ("files", 40)):
        out = d / f"{workflow.split('.')[-1]}.jsonl"
        generate.main(["--workflow", workflow, "--split", "train", "--n", str(n), "--out", str(out),
                       "--workers", "1", "--quiet"])
        paths.append(str(out))
    tok = tokenizer.train(paths, str(d / "tok"), vocab_size=600)
    return {"dir": d, "jsonl": paths, "tokenizer": tok}


def documents(summary):
    return {w["name"]: w["documents"] for w in summary["workflows"]}


def test_pack_weights_set_each_workflows_share(mixture, tmp_path):
    common = ["--tokenizer", mixture["tokenizer"], "--seq-len", "1024", "--quiet", "--workers", "1"]
    plain = pack.main(common + ["--out", str(tmp_path / "p"), *mixture["jsonl"]])
    n = documents(plain)
    assert set(n) == {"calc", "files"} and sum(n.values()) == plain["documents"] and plain["weights"] == {}
    mixed = pack.main(common + ["--out", str(tmp_path / "m"), "--weight", "calc=2", "--weight", "files=0.5",
                                *mixture["jsonl"]])
    m = documents(mixed)
    assert m["calc"] == 2 * n["calc"] and 0.2 * n["files"] <= m["files"] <= 0.8 * n["files"]
    assert mixed["documents"] == sum(m.values()) and mixed["weights"] == {"calc": 2.0, "files": 0.5}
    again = pack.main(common + ["--out", str(tmp_path / "m2"), "--weight", "calc=2", "--weight", "files=0.5",
                                *mixture["jsonl"]])
    assert documents(again) == m  # seeded
    only = pack.main(common + ["--out", str(tmp_path / "o"), "--weight", "files=0", *mixture["jsonl"]])
    assert documents(only) == {"calc": n["calc"]}
    for bad, msg in ((["--weight", "sql=1"], "do not hold: ['sql']"), (["--weight", "calc"], "WORKFLOW=W"),
                     (["--weight", "calc=-1"], "WORKFLOW=W")):
        with pytest.raises(SystemExit) as e:
            pack.main(common + ["--out", str(tmp_path / "x"), *bad, *mixture["jsonl"]])
        assert e.value.code != 0


@pytest.mark.slow
def test_train_and_infer_report_success_per_workflow(mixture, tmp_path, run_script, capsys):
    data = tmp_path / "mix"
    pack.main(["--tokenizer", mixture["tokenizer"], "--seq-len", "1024", "--quiet", "--workers", "1",
               "--out", str(data), *mixture["jsonl"]])
    out = tmp_path / "run"
    run_script("train.py", f"--data={data}", "--model=tiny", "--batch-size=2", "--max-steps=3", "--eval-every=0",
               f"--out={out}", "--eval-episodes=2", "--wandb=disabled")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in reversed(rows) if "eval/success_rate" in r)
    per = {k: v for k, v in last.items() if k.startswith("eval/success_rate/")}
    assert set(per) == {"eval/success_rate/calc", "eval/success_rate/files"}
    assert last["eval/success_rate"] == pytest.approx(sum(per.values()) / 2)
    agent = json.loads((out / open(out / "latest").read().strip() / "agent.json").read_text())
    assert [w["name"] for w in agent["workflows"]] == ["calc", "files"]  # most documents first

    p = run_script("infer.py", f"--agent={out}", "--eval", "--workflow=all", "--episodes=2", "--max-steps=2",
                   "--max-new-tokens=16")
    ck = out / open(out / "latest").read().strip()
    summary = json.loads((ck / "eval_test_incremental_all.json").read_text())
    assert set(summary["success_rate_by_workflow"]) == {"calc", "files"}
    assert all(s["episodes"] == 2 for s in summary["workflows"].values())
    for name in ("calc", "files"):
        assert (ck / f"traces_test_incremental_{name}.jsonl").read_text().count("\n") == 2
        assert f"== {name}" in p.stdout
    assert "mean" in p.stdout
