"""The code workflow and its sandbox: limits and refusals hold, the teacher solves every task
(also with faults and mistakes), a typical bug fails both the visible and the hidden tests, and
the splits share no function name."""
import json
import os

import pytest

from agentc.workflows.base import SPLITS, load_workflow, run_teacher
from agentc.workflows.code import FAMILIES, pool
from agentc.workflows.sandbox import run_tests
from tests.workflow_helpers import seeds, workflow_fixtures

N_TASKS = 60  # per split; every task runs two sandboxed processes
seed_of = seeds("code")
wf, episodes = workflow_fixtures("code", N_TASKS)


CASES = [{"args": [[1, 5, 3]], "expected": [5]}, {"args": [[]], "expected": []}]


@pytest.mark.parametrize("source, error, results", [
    ("def f(xs):\n    return [x for x in xs if x > 3]\n", None, [True, True]),
    ("def f(xs):\n    print('noise')\n    return [x for x in xs if x >= 3]\n", None, [False, True]),
    ("def f(xs):\n    return xs[0]\n", None, [False, "IndexError"]),
    # 2 s of CPU until the limit: in -m slow (test_sandbox.py's default run meets the same limit)
    pytest.param("def f(xs):\n    while True:\n        pass\n", "ran out of CPU time", [], marks=pytest.mark.slow),
    ("def f(xs):\n    return [0] * 10**10\n", None, ["MemoryError"] * 2),
    ("import socket\ndef f(xs):\n    socket.create_connection(('127.0.0.1', 9))\n", None,
     ["PermissionError: sandbox: socket"] * 2),
    ("import subprocess\ndef f(xs):\n    subprocess.run(['true'])\n", None, ["PermissionError: sandbox: subprocess"] * 2),
    ("import os\ndef f(xs):\n    os.system('true')\n", None, ["PermissionError: sandbox: os.system"] * 2),
    ("def f(xs):\n    open('/usr/agentc-sandbox-escape', 'w')\n", None, ["PermissionError: sandbox: writing"] * 2),
    ("def f(xs):\n    open('/tmp/agentc-sandbox-escape', 'w')\n", None, [False, False]),
    ("def f(xs):\n    open('scratch.txt', 'w').write('ok')\n    return [5] if xs else []\n", None, [True, True]),
    ("def g(xs):\n    return []\n", "does not define a function f", []),
    ("def f(xs:\n    return []\n", "SyntaxError", []),
    ("raise ValueError('at import')\n", "ValueError: at import (solution.py line 1)", []),
])
def test_sandbox(source, error, results):
    report = run_tests(source, "f", CASES)
    if error is None:
        assert report.error is None, report
        for want, got in zip(results, report.results):
            if isinstance(want, bool):
                assert got["ok"] is want
            else:
                assert not got["ok"] and got["raised"].startswith(want), got
    else:
        assert error in report.error and not report.ok
    assert not os.path.exists("/tmp/agentc-sandbox-escape") and not os.path.exists("/usr/agentc-sandbox-escape")


def test_sandbox_output_does_not_confuse_the_report():
    src = "import sys\ndef f(xs):\n    print('{\"error\": \"fake\"}')\n    sys.stdout.write('\\n')\n    return []\n"
    report = run_tests(src, "f", [{"args": [[]], "expected": []}])
    assert report.ok and '"fake"' in report.stdout


@pytest.mark.slow
def test_teacher_solves_every_task(episodes):
    for split, eps in episodes.items():
        failed = [(e.task.id, e.task.family, e.verdict.reason, e.error) for e in eps if not e.verdict.ok]
        assert not failed, f"{split}: {failed[:3]}"
        assert len({e.task.family for e in eps}) >= 10, f"{split}: families drawn {sorted({e.task.family for e in eps})}"
        for e in eps:
            names = [m["tool_calls"][0]["function"]["name"] for m in e.messages if m.get("tool_calls")]
            assert names == ["show_tests", "test_solution"]
    assert len(FAMILIES) == 12


@pytest.mark.slow
def test_teacher_solves_every_task_with_faults_and_mistakes():
    wf = load_workflow("code", fault_rate=0.1, mistake_rate=0.1)
    n_faults = 0
    for split in SPLITS:
        for i in range(40):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
            n_faults += sum(o.kind == "transient" for o in ep.observations)
    assert n_faults > 5


@pytest.mark.slow
def test_bugs_fail_visible_and_hidden_tests_and_the_fix_quotes_the_failure(wf):
    """mistake_rate=1: every task first submits its family's bug (untrained, its test report an
    error naming a failing case); the reasoning of the fix quotes that case; the same bug as the
    final solution fails the hidden tests."""
    mistaken = load_workflow("code", mistake_rate=1.0)
    families = set()
    for i in range(40):
        task = mistaken.sample_task("train", i, seed_of("train", i))
        ep = run_teacher(mistaken, task)
        assert ep.verdict.ok, (task.id, ep.verdict.reason, ep.error)
        k = next(k for k, m in enumerate(ep.messages) if m.get("weight") == 0)
        report = ep.messages[k + 1]["content"]
        assert report.startswith("Error: ") and "tests failed" in report
        failing_case = report.splitlines()[1]
        assert ep.messages[k + 2]["reasoning"].startswith(failing_case.split(" returned")[0].split(" raised")[0])
        bug = json.loads(ep.messages[k]["tool_calls"][0]["function"]["arguments"])["code"]
        env = mistaken.make_env(task)
        env.solution = bug
        assert not mistaken.check(task, env, "done").ok, task.family
        families.add(task.family)
    assert len(families) >= 10


@pytest.mark.slow
def test_checker_needs_a_submission_and_rejects_wrong_code(wf, episodes):
    ep = episodes["test"][0]
    env = wf.make_env(ep.task)
    assert wf.check(ep.task, env, "done").reason == "no solution was submitted"
    env.solution = f"def {ep.task.gold['function']}(x):\n    return None\n"
    assert not wf.check(ep.task, env, "done").ok
    env.solution = "def other(x):\n    return None\n"
    assert "does not define" in wf.check(ep.task, env, "done").reason


@pytest.mark.slow
def test_splits_share_no_function_names(episodes):
    train, test = set(pool("name", "train", 0.3)), set(pool("name", "test", 0.3))
    assert train and test and not train & test
    for split, names in (("train", train), ("test", test)):
        assert all(ep.task.gold["function"] in names for ep in episodes[split])
    assert sum(ep.task.heldout == "template" for ep in episodes["test"]) >= 10
    assert all(ep.task.heldout == "seen" for ep in episodes["train"])


def test_same_seed_same_task(wf):
    a, b = (wf.sample_task("test", 7, seed_of("test", 7)) for _ in range(2))
    assert a.to_dict() == b.to_dict()
    assert run_teacher(wf, a).messages == run_teacher(wf, b).messages
