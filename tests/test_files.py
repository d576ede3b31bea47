"""The files workflow: the teacher solves every task (also with faults and mistakes), the splits
share no file name or value, the tools behave like their shell namesakes, and the checker rejects
wrong answers and wrong final trees."""
import json
import os

from agentc.workflows.base import heldout_templates, load_workflow, run_teacher
from agentc.workflows.files import FAMILIES, FilesEnv, Tree, build_tree, pool
from tests.workflow_helpers import assert_same_digest_in_another_process, calls, seeds, workflow_fixtures

N_TASKS = 250  # per split
seed_of = seeds("files")
wf, episodes = workflow_fixtures("files", N_TASKS)


def test_teacher_solves_every_task(episodes):
    for split, eps in episodes.items():
        failed = [(e.task.id, e.task.family, e.verdict.reason, e.error) for e in eps if not e.verdict.ok]
        assert not failed, f"{split}: {failed[:3]}"
        assert {e.task.family for e in eps} == set(FAMILIES), f"{split}: some family never drawn"
    modifying = {e.task.family for e in episodes["train"] if e.task.gold["kind"] == "state"}
    assert modifying == {"set_value", "append_line", "copy_file", "create_file"}
    for ep in episodes["train"]:  # a file named in the question is found before it is read or changed
        names = [n for n, _ in calls(ep)]
        if "file" in ep.task.params:
            assert names[0] == "find" and calls(ep)[0][1]["name"] == ep.task.params["file"]


def test_teacher_solves_every_task_with_faults_and_mistakes():
    wf = load_workflow("files", fault_rate=0.1, mistake_rate=0.1)
    n_faults = n_mistakes = 0
    for split, n in (("train", 150), ("test", 80)):
        for i in range(n):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
            n_faults += sum(o.kind == "transient" for o in ep.observations)
            n_mistakes += sum(m.get("weight") == 0 for m in ep.messages)
    assert n_faults > 30 and n_mistakes > 15


def test_deliberate_mistakes_are_untrained_rejected_and_fixed():
    """A mistake is the right file name in the wrong place: the tool says so, nothing changes
    (modifying tasks still end in the gold tree), and the fix names the right path."""
    wf = load_workflow("files", mistake_rate=0.5)
    tools, n = set(), 0
    for i in range(150):
        ep = run_teacher(wf, wf.sample_task("train", i, seed_of("train", i)))
        assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
        for k, m in enumerate(ep.messages):
            if m.get("weight") != 0:
                continue
            n += 1
            wrong, fix = (json.loads(ep.messages[j]["tool_calls"][0]["function"]["arguments"]) for j in (k, k + 2))
            assert ep.messages[k + 1]["content"].startswith("Error: no such")
            assert wrong["path"] != fix["path"] and os.path.basename(wrong["path"]) == os.path.basename(fix["path"])
            assert fix["path"] in ep.messages[k + 2]["reasoning"]
            tools.add(ep.messages[k]["tool_calls"][0]["function"]["name"])
    assert n > 60 and tools == {"cat", "wc", "write"}


def test_splits_share_no_names_or_values(episodes):
    for name in ("noun", "key", "value", "event"):
        train, test = set(pool(name, "train", 0.3)), set(pool(name, "test", 0.3))
        assert train and test and not train & test, name
    test_nouns, train_nouns = set(pool("noun", "test", 0.3)), set(pool("noun", "train", 0.3))
    for i in range(30):
        tree = build_tree(seed_of("test", i), "test", 0.3)
        for p in tree.files:
            stem = os.path.basename(p).rsplit(".", 1)[0]
            assert set(stem.split("_")) <= test_nouns, p
        words = {w.strip(".:#").lower() for body in tree.files.values() for w in body.split()}
        assert not words & train_nouns
    for ep in episodes["test"]:
        assert not {str(v) for v in ep.task.params.values()} & set(pool("value", "train", 0.3))


def test_heldout_templates_only_in_test(episodes, wf):
    held = {f: heldout_templates(list(fam.templates), wf.heldout_template_share, salt=f"files-{f}")
            for f, fam in FAMILIES.items()}
    assert all(held.values())
    for ep in episodes["train"]:
        assert ep.task.heldout == "seen" and ep.task.params["template"] not in held[ep.task.family]
    assert sum(ep.task.heldout == "template" for ep in episodes["test"]) >= 30


def small_tree():
    return Tree({"/docs/a.md": "one TODO: x\ntwo\n", "/docs/sub/b.md": "three\n", "/logs/c.log": "x ERROR y\n"},
                {"/", "/docs", "/docs/sub", "/logs", "/empty"})


def test_tools():
    env = FilesEnv(small_tree())
    assert env.call("ls", {}).text == "docs/\nempty/\nlogs/"
    assert env.call("ls", {"path": "docs"}).text == "a.md\nsub/"
    assert env.call("ls", {"path": "/empty"}).text == "(empty)"
    assert env.call("cat", {"path": "/docs/../docs/a.md"}).text == "one TODO: x\ntwo\n"
    assert env.call("grep", {"pattern": "t[wh]", "path": "/docs"}).text == "/docs/a.md:2:two\n/docs/sub/b.md:1:three"
    assert env.call("grep", {"pattern": "o", "count": True}).text == "/docs/a.md:2"
    assert env.call("grep", {"pattern": "zzz"}).text == "(no matches)"
    assert env.call("find", {"name": "*.md"}).text == "/docs/a.md\n/docs/sub/b.md"
    assert env.call("find", {"name": "b.md", "path": "/logs"}).text == "(nothing found)"
    assert env.call("wc", {"path": "/docs/a.md"}).text == "2 4 16 /docs/a.md"
    assert env.call("wc", {"path": "/docs"}).text == "2 4 16 /docs/a.md"  # not below it
    for name, args, kind, text in [
        ("cat", {"path": "/docs/zz.md"}, "tool_error", "no such file: /docs/zz.md"),
        ("cat", {"path": "/docs"}, "tool_error", "is a directory"),
        ("ls", {"path": "/nope"}, "tool_error", "no such file or directory"),
        ("grep", {"pattern": "(", "path": "/"}, "tool_error", "bad pattern"),
        ("write", {"path": "/nope/x.txt", "content": "y"}, "tool_error", "no such directory: /nope"),
        ("write", {"path": "/docs/sub", "content": "y"}, "tool_error", "is a directory"),
        ("cat", {"path": " "}, "tool_error", "empty path"),
        ("cat", {}, "bad_arguments", "path"),
        ("rm", {"path": "/docs/a.md"}, "unknown_tool", "Available tools: ls, cat, grep, find, wc, write"),
    ]:
        obs = env.call(name, args)
        assert obs.kind == kind and text in obs.text, (name, args, obs)
    assert env.tree.digest() == small_tree().digest()  # failed calls changed nothing
    assert env.call("write", {"path": "empty/new.txt", "content": "hi\n"}).ok
    assert env.call("cat", {"path": "/empty/new.txt"}).text == "hi\n"
    assert env.tree.digest() != small_tree().digest()


def test_checker_rejects_wrong_answers_and_trees(wf, episodes):
    by_family = {}
    for ep in episodes["test"]:
        by_family.setdefault(ep.task.family, ep)
    for family, ep in by_family.items():
        task, gold = ep.task, ep.task.gold
        env = wf.make_env(task)
        if gold["kind"] == "state":
            assert not wf.check(task, env, "Done.").ok  # nothing written yet
            for name, args in calls(ep):
                env.call(name, args)
            assert wf.check(task, env, "Done.").ok
            path = max(env.tree.files, key=len)
            env.call("write", {"path": path, "content": env.tree.files[path] + "extra\n"})
            assert not wf.check(task, env, "Done.").ok, family
        elif gold["kind"] == "number":
            assert wf.check(task, env, str(gold["value"])).ok and not wf.check(task, env, str(gold["value"] + 1)).ok
        elif gold["kind"] == "text":
            assert wf.check(task, env, gold["value"]).ok and not wf.check(task, env, gold["value"] + "x").ok
        else:
            assert wf.check(task, env, ", ".join(reversed(gold["value"]))).ok  # unordered
            assert not wf.check(task, env, ", ".join(gold["value"][1:] or ["/x"])).ok


def test_deterministic_across_processes(wf):
    assert_same_digest_in_another_process("files", "test", 25, hash_seed="4321", wf=wf)
