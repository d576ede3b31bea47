"""On-policy data: the teacher takes over from states it did not reach itself, and the collection
turns the agent's episodes into DAgger and expert-iteration records.

The takeover is checked per workflow from two kinds of prefixes: a near-random agent (random tools,
arguments built from the task's own values and junk, random writes) and a "trained" one (the
teacher's own calls with the workflow's deliberate mistakes, repeats and reorderings, as a
half-trained agent makes them). Of the states the takeover does not mark unrecoverable, its
continuation must pass the checker in at least 95%."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from agentc.data import audit, mix, pack
from agentc.runtime import onpolicy
from agentc.data.format import render
from agentc.runtime.episode import run_batch
from agentc.runtime.engine import Engine
from agentc.workflows.base import Call, load_workflow, task_seed
from agentc.workflows.takeover import Unrecoverable, agent_steps, first_departure, take_over, teacher_plan
from workflow_helpers import ROOT, tiny_sql_agent

WORKFLOWS = {"sql": 10, "files": 10, "support": 10, "shop": 10, "code": 3}
JUNK = ["", "x", "none", "0", "orders", "SELECT 1", "../etc", "Widget", "C00001", "42"]


def _values(obj) -> list:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _values(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _values(x)]
    return [obj]


def random_args(tool, rng: random.Random, pool: list) -> dict:
    """Arguments that usually pass the tool's schema: values of the right type from the task's own
    calls and prompt, or junk."""
    args = {}
    for name, prop in tool.parameters["properties"].items():
        if name not in tool.parameters["required"] and rng.random() < 0.5:
            continue
        kind = prop.get("type") or (prop.get("anyOf") or [{}])[0].get("type")
        if "enum" in prop:
            args[name] = rng.choice(prop["enum"])
        elif kind == "integer":
            args[name] = rng.choice([v for v in pool if isinstance(v, int) and not isinstance(v, bool)] or [0, 1, 7])
        elif kind == "number":
            args[name] = rng.uniform(0, 100)
        elif kind == "boolean":
            args[name] = rng.random() < 0.5
        else:
            args[name] = rng.choice([v for v in pool if isinstance(v, str)] + JUNK)
    return args


def random_prefix(wf, task, plan, rng: random.Random) -> list:
    env = wf.make_env(task)
    try:
        tools = env.tools()
    finally:
        env.close()
    pool = _values([a for _, a, _ in plan.calls]) + task.prompt.split()
    if wf.name == "sql":   # random writes too, so states off the teacher's path come up
        pool += ["DELETE FROM " + t for t in ("orders", "customers", "sales", "buyers")] + \
                ["UPDATE orders SET status = 'pending'"]
    out = []
    for _ in range(rng.randint(0, 6)):
        if plan.calls and rng.random() < 0.4:
            tool_name, args, _ = rng.choice(plan.calls)
            out.append((tool_name, args))
        else:
            t = rng.choice(tools)
            out.append((t.name, random_args(t, rng, pool)))
    return out


def trained_prefix(wf, task, plan, rng: random.Random) -> list:
    """The teacher's calls cut anywhere, with a deliberate mistake, a repeat or a swap mixed in."""
    from agentc.workflows.base import Call
    calls = [(t, a) for t, a, _ in plan.calls][:rng.randint(0, len(plan.calls))]
    env = wf.make_env(task)
    try:
        for t, a in calls:
            env.call(t, a)
        if plan.calls and rng.random() < 0.5:
            nxt = plan.calls[min(len(calls), len(plan.calls) - 1)]
            wrong = wf.mistake(task, env, Call(nxt[0], nxt[1]), rng)
            if wrong is not None:
                calls.append((wrong.call.tool, wrong.call.args))
    finally:
        env.close()
    if calls and rng.random() < 0.3:
        calls.append(rng.choice(calls))
    if len(calls) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(calls) - 1)
        calls[i], calls[i + 1] = calls[i + 1], calls[i]
    return calls


@pytest.mark.parametrize("name", WORKFLOWS)
def test_takeover_continues_from_the_states_agents_reach(name):
    wf = load_workflow(name)
    outcomes, reasons = Counter(), Counter()
    for i in range(WORKFLOWS[name]):
        task = wf.sample_task("train", i, task_seed(0, name, "train", i))
        plan = teacher_plan(wf, task)
        assert plan.verdict.ok, plan.verdict.reason
        rng = random.Random(i)
        for kind, make in (("random", random_prefix), ("trained", trained_prefix)):
            for _ in range(4):
                try:
                    cont = take_over(wf, task, make(wf, task, plan, rng), plan)
                except Unrecoverable as e:
                    reasons[e.reason] += 1
                    continue
                outcomes[kind, cont.verdict.ok] += 1
    for kind in ("random", "trained"):
        ok, bad = outcomes[kind, True], outcomes[kind, False]
        assert ok + bad >= WORKFLOWS[name] * 2, (kind, outcomes, reasons)
        assert ok >= 0.95 * (ok + bad), (name, kind, outcomes, reasons)
    assert set(reasons) <= {"state_off_plan"}, reasons


def sql_task(index: int, family: str | None = None):
    wf = load_workflow("sql")
    i = index
    while True:
        task = wf.sample_task("train", i, task_seed(0, "sql", "train", i))
        if family is None or task.family == family:
            return wf, task
        i += 1


def test_takeover_reuses_what_the_agent_already_did():
    wf, task = sql_task(0, "customer_spend")
    plan = teacher_plan(wf, task)
    done = [(t, a) for t, a, _ in plan.calls[:-1]]   # everything but the last query
    cont = take_over(wf, task, done, plan)
    assert cont.verdict.ok and cont.reused == len(done) and cont.sent == 1
    tools = [m["tool_calls"][0]["function"]["name"] for m in cont.messages if m.get("tool_calls")]
    assert tools == ["run_sql"] and cont.messages[-1]["content"] == cont.answer


def test_a_finished_write_needs_only_the_answer_and_a_wrong_one_is_unrecoverable():
    wf, task = sql_task(0, "raise_prices")
    plan = teacher_plan(wf, task)
    assert plan.changes_state
    calls = [(t, a) for t, a, _ in plan.calls]
    cont = take_over(wf, task, calls, plan)
    assert [m["role"] for m in cont.messages] == ["assistant"] and cont.verdict.ok
    # the same raise twice: no state on the teacher's path
    with pytest.raises(Unrecoverable) as e:
        take_over(wf, task, calls + calls[-1:], plan)
    assert e.value.reason == "state_off_plan"


def _messages(wf, task, calls, answer):
    """A runtime-style transcript of an agent making `calls` and answering `answer`."""
    env, msgs = wf.make_env(task), [{"role": "user", "content": task.prompt}]
    try:
        for n, (t, a) in enumerate(calls):
            msgs.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{n}", "type": "function", "function": {"name": t, "arguments": json.dumps(a)}}]})
            msgs.append({"role": "tool", "tool_call_id": f"call_{n}", "name": t, "content": env.call(t, a).text})
    finally:
        env.close()
    return msgs + [{"role": "assistant", "content": answer}]


def test_first_departure_names_where_and_why():
    wf, task = sql_task(3, "customer_spend")
    plan = teacher_plan(wf, task)
    calls, answer = [(t, a) for t, a, _ in plan.calls], plan.answer["content"]
    dep = lambda c, a, ok: first_departure(wf, task, agent_steps(_messages(wf, task, c, a)), plan, ok)  # noqa: E731
    assert (dep(calls, answer, True).step, dep(calls, answer, True).why) == (len(calls), "")
    assert (dep(calls, "12", False).step, dep(calls, "12", False).why) == (len(calls), "wrong_answer")
    bad = calls[:2] + [("run_sql", {"query": "SELECT nope FROM nowhere"})] + calls[2:]
    assert (dep(bad, answer, False).step, dep(bad, answer, False).why) == (2, "failed_call")
    again = calls[:2] + calls[1:2] + calls[2:]
    assert (dep(again, answer, False).step, dep(again, answer, False).why) == (2, "repeated")
    other = calls[:1] + [("run_sql", {"query": "SELECT 1"})] + calls[1:]
    assert (dep(other, answer, False).step, dep(other, answer, False).why) == (1, "not_in_plan")


def test_a_look_in_another_form_is_on_the_plan_and_not_taken_again():
    """The teacher peeks at the date column one way, the agent the other: the agent has not left
    the plan, and the teacher taking over after it does not peek again."""
    wf, task = sql_task(0, "month_orders")
    plan = teacher_plan(wf, task)
    calls = [(t, a) for t, a, _ in plan.calls]
    k = next(i for i, (t, a) in enumerate(calls) if t == "run_sql" and wf.lookaround(Call(t, a)))
    query = calls[k][1]["query"]
    col, table = re.search(r"(\w+)\)? (?:AS \w+ )?FROM (\w+)", query).groups()
    other = f"SELECT {col} FROM {table} LIMIT 3" if "MIN(" in query else \
        f"SELECT MIN({col}) AS first, MAX({col}) AS last FROM {table}"
    mine = calls[:k] + [("run_sql", {"query": other})]
    assert wf.lookaround(Call("run_sql", {"query": other})) == wf.lookaround(Call(*calls[k]))
    steps = agent_steps(_messages(wf, task, mine + calls[k + 1:], plan.answer["content"]))
    assert first_departure(wf, task, steps, plan, True).why == ""
    cont = take_over(wf, task, mine, plan)
    assert cont.verdict.ok and cont.sent == len(calls) - k - 1
    # an extra look the plan does not have is no departure either; a second identical one is
    extra = calls[:1] + [("describe_table", {"table": "nothing_needed"})]
    steps = agent_steps(_messages(wf, task, calls[:1] + [("run_sql", {"query": f"SELECT {col} FROM {table}"})] * 2,
                                  "3"))
    assert (first_departure(wf, task, steps, plan, False).step, first_departure(wf, task, steps, plan, False).why) \
        == (2, "repeated")
    assert first_departure(wf, task, agent_steps(_messages(wf, task, extra, "3")), plan, False).why == "failed_call"


# ----------------------------------------------------------------------------- records


def forced(tokens):
    it = iter(tokens)
    return lambda logits: next(it)


def test_label_makes_dagger_and_expert_records_that_pack(sql_corpus, tmp_path):
    """Episodes forced through the runtime: the teacher's own (an expert record) and the teacher's
    calls with a wrong answer (a DAgger record: the agent's steps at weight 0, the teacher's answer
    trained). Both render, pack and audit, counted by origin."""
    from agentc.data.format import SRC_MODEL
    agent = tiny_sql_agent(sql_corpus["tok"])
    jobs, tokens = [], {}
    for i in range(2):
        wf, task = agent.workflow, sql_task(10 + 7 * i)[1]
        plan = teacher_plan(wf, task)
        msgs = _messages(wf, task, [(t, a) for t, a, _ in plan.calls], plan.answer["content"] if i == 0 else "no idea")
        ref = render({"messages": msgs}, agent.tok)
        jobs.append((task, i))
        tokens[i] = ref.ids[ref.sources == SRC_MODEL].tolist()
    engine = Engine(agent.model, agent.tok, rows=2, max_len=2048)
    results = dict(run_batch(agent, jobs, engine, policies=lambda i: forced(tokens[i]), max_steps=32))
    assert results[0].success and not results[1].success
    lines = []
    for (task, i) in jobs:
        record, log = onpolicy.label(agent, task, results[i], {"index": i, "agent": "x", "round": 1,
                                                               "temperature": 0.0}, onpolicy.SOURCES)
        assert record is not None, log
        lines.append(json.dumps(record))
    expert, dagger = (json.loads(x) for x in lines)
    assert expert["meta"]["source"] == "expert" and dagger["meta"]["source"] == "dagger"
    assert dagger["meta"]["why"] == "wrong_answer" and dagger["meta"]["takeover_step"] == dagger["meta"]["departure"]
    agent_part = [m for m in dagger["messages"] if m["role"] == "assistant"][:-1]
    assert agent_part and all(m["weight"] == 0 for m in agent_part)
    assert "weight" not in dagger["messages"][-1] and dagger["messages"][-1]["content"] != "no idea"
    assert all("weight" not in m for m in expert["messages"])
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    summary = pack.main([str(tmp_path / "r.jsonl"), "--tokenizer", sql_corpus["tokenizer"], "--seq-len", "4096",
                         "--out", str(tmp_path / "p"), "--quiet"])
    assert summary["documents_by_origin"] == {"expert": 1, "dagger": 1}
    report = audit.audit([str(tmp_path / "p")], progress=False)
    assert report["ok"] and set(report["by_origin"]) == {"expert", "dagger"}
    assert report["by_origin"]["expert"]["trained_tokens"] > report["by_origin"]["dagger"]["trained_tokens"] > 0


# ----------------------------------------------------------------------------- the command


def run_cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    p = subprocess.run([sys.executable, "-m", "agentc.runtime.onpolicy", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_the_command_collects_counts_and_refuses_bad_input(trained_run, tmp_path):
    """A barely trained agent of the calc workflow: its episodes fail, the teacher takes over (or,
    on the tasks its own teacher gets wrong, is counted as failed)."""
    out = tmp_path / "r.jsonl"
    run_cli("--agent", str(trained_run["out"]), "--episodes", "8", "--max-new-tokens", "12", "--max-steps", "2",
            "--batch", "4", "--out", str(out), "--quiet")
    stats = json.loads((tmp_path / "r.jsonl.stats.json").read_text())
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["episodes"] == 8 and stats["records"]["dagger"] == len(records) > 0
    assert sum(stats["skipped"].values()) + len(records) == 8
    assert set(stats["skipped"]) <= {"teacher_failed", "takeover_rejected", "error:RuntimeError"}
    assert all(r["meta"]["source"] == "dagger" and r["meta"]["round"] == 1 and "takeover_step" in r["meta"]
               for r in records)
    assert len((tmp_path / "r.jsonl.episodes.jsonl").read_text().splitlines()) == 8
    assert not list(tmp_path.glob("*.partial*"))
    p = run_cli("--agent", str(trained_run["out"]), "--episodes", "2", "--workflow", "sql", "--out", str(out), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "['calc']" in p.stderr and "--workflow sql" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("--agent", str(tmp_path / "nothing"), "--episodes", "2", "--out", str(out), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "nothing" in p.stderr
    old = tmp_path / "old_layout"   # an agent of another token layout
    shutil.copytree(trained_run["ck"], old)
    meta = json.loads((old / "agent.json").read_text())
    (old / "agent.json").write_text(json.dumps(meta | {"layout_version": 0}))
    p = run_cli("--agent", str(old), "--episodes", "2", "--out", str(out), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "token layout 0" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_killed_collection_resumes_to_identical_output(trained_run, tmp_path):
    from test_crash import kill_when
    args = ["--agent", str(trained_run["out"]), "--episodes", "40", "--max-new-tokens", "12", "--max-steps", "3",
            "--batch", "4", "--temperature", "0.7", "--quiet"]
    run_cli(*args, "--out", str(tmp_path / "whole.jsonl"))
    out, rng, landed = tmp_path / "killed.jsonl", random.Random(3), 0
    partial = tmp_path / "killed.jsonl.episodes.jsonl.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "agentc.runtime.onpolicy", *args, "--out", str(out),
                                 *(["--resume"] if trial else [])], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 0, rng, 0.3)
        if out.exists():
            break
        landed += 1
    assert landed >= 1
    run_cli(*args, "--out", str(out), "--resume")
    for suffix in ("", ".episodes.jsonl"):
        assert (tmp_path / f"killed.jsonl{suffix}").read_bytes() == (tmp_path / f"whole.jsonl{suffix}").read_bytes()


# ----------------------------------------------------------------------------- the mixture


def test_mix_draws_the_teacher_by_failure_rate(tmp_path, capsys):
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"messages": [], "meta": {"workflow": "sql", "family": f, "i": i}}) + "\n"
                               for i in range(400) for f in ("easy", "hard")))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"run": {"workflow": "sql"}, "by_family": {"easy": {"rate": 1.0},
                                                                           "hard": {"rate": 0.2}}}))
    onp = tmp_path / "onp.jsonl"
    onp.write_text("".join(json.dumps({"messages": [], "meta": {"source": s, "family": "hard"}}) + "\n"
                           for s in ("dagger", "expert", "dagger")))
    base = ["--teacher", str(teacher), "--teacher-n", "200", "--onpolicy", str(onp)]
    plain = mix.main([*base, "--out", str(tmp_path / "a.jsonl"), "--sources", "dagger"])
    cur = mix.main([*base, "--out", str(tmp_path / "b.jsonl"), "--curriculum", str(stats)])
    again = mix.main([*base, "--out", str(tmp_path / "c.jsonl"), "--curriculum", str(stats)])
    assert plain["onpolicy"] == {"dagger": 2} and cur["onpolicy"] == {"dagger": 2, "expert": 1}
    assert plain["teacher"] == cur["teacher"] == 200
    share = lambda s: s["teacher_families"]["sql/hard"] / 200  # noqa: E731
    assert 0.4 < share(plain) < 0.6 and share(cur) > 0.75   # weights 0.9 against 0.1
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes() and again == cur
    for bad, words in (([*base, "--teacher-n", "9999"], "holds only"),
                       ([*base, "--curriculum", str(tmp_path / "none.json")], "no such file"),
                       ([*base, "--curriculum", str(onp)], f"--curriculum {onp}"),
                       ([*base, "--curriculum", str(tmp_path / "a.jsonl.stats.json")], "by_family"),
                       ([*base, "--sources", "all"], "--sources all")):
        with pytest.raises(SystemExit):
            mix.main([*bad, "--out", str(tmp_path / "x.jsonl")])
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_collection_split_over_two_ranks_equals_one_process(trained_run, tmp_path):
    from test_train import TWO_RANKS
    args = [os.path.join(ROOT, "agentc", "runtime", "onpolicy.py"), "--agent", str(trained_run["out"]), "--episodes", "9", "--max-new-tokens", "12",
            "--max-steps", "2", "--batch", "3", "--temperature", "1.0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    for name, launcher in (("one", (sys.executable,)), ("two", TWO_RANKS)):
        p = subprocess.run([*launcher, *args, "--out", str(tmp_path / f"{name}.jsonl")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("wrote ") == 1
    for suffix in (".jsonl", ".jsonl.episodes.jsonl"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f or f.endswith(".partial")]


def test_a_takeover_that_raises_is_counted_and_skipped():
    """A teacher with a bug: the episode's log line names the error, and no record is made."""
    from types import SimpleNamespace

    from agentc.workflows.base import load_workflow as load
    wf = load("tests.fake_workflow")

    def broken_teacher(task, env):
        raise RuntimeError("the teacher has a bug")
        yield  # unreachable: makes this a generator
    wf.teacher = broken_teacher
    task = wf.sample_task("train", 0, 4)
    agent = SimpleNamespace(workflow=wf, meta={})
    result = SimpleNamespace(success=False, failure="wrong_answer", messages=[{"role": "user", "content": "x"}],
                             steps=[])
    record, log = onpolicy._label_safely(agent, task, result, {"index": 0}, onpolicy.SOURCES)
    assert record is None and log["outcome"] == "skipped" and log["reason"] == "error:RuntimeError"
    assert "bug" in log["error"]


@pytest.mark.slow
def test_rounds_script_runs_end_to_end(trained_run, calc_corpus, calc_shards, tmp_path):
    """runs/onpolicy.sh on the calc agent: one round of play, mix, pack, audit, train, then the test."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text(open(calc_corpus["jsonl"]).read())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
           "D": str(d), "AGENT": str(trained_run["out"]), "OUT": str(tmp_path / "rounds"), "ROUNDS": "1", "N": "4",
           "TEACHER_N": "20", "STEPS": "2", "TOK": calc_corpus["tokenizer"], "SEQ": "512",
           "VAL": calc_shards["val"], "EPISODES": "2"}
    p = subprocess.run(["bash", "runs/onpolicy.sh", "--wandb=disabled", "--dtype=float32"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r1 = tmp_path / "rounds" / "r1"
    mixed = json.loads((r1 / "mix.jsonl.stats.json").read_text())
    assert mixed["teacher"] == 20 and mixed["curriculum_weights"]
    assert json.loads((r1 / "train.json").read_text())["documents_by_origin"]["teacher"] == 20
    assert (r1 / "model" / "latest").exists() and "2 test episodes" in p.stdout


def test_each_round_plays_other_tasks():
    wf = load_workflow("sql")
    one, two = (onpolicy.collect_tasks(wf, 20, onpolicy.COLLECT_SEED, r) for r in (1, 2))
    assert [t.id for t in one] == [t.id for t in onpolicy.collect_tasks(wf, 20, onpolicy.COLLECT_SEED, 1)]
    assert not {t.seed for t in one} & {t.seed for t in two}
    assert all(t.split == "train" for t in one + two)
