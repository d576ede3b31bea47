"""The shop workflow: the teacher buys a matching product (or rightly buys nothing) in every task,
also with faults and mistakes; the tools behave; the checker scores attributes, options, price and
the no-match answer; the splits share no product kind, attribute or color."""
import json

from agentc.workflows.base import SPLITS, load_workflow, run_teacher
from agentc.workflows.shop import Product, Request, ShopEnv, build_catalogue, pool
from tests.workflow_helpers import seeds, workflow_fixtures

N_TASKS = 200
seed_of = seeds("shop")
wf, episodes = workflow_fixtures("shop", N_TASKS)


def test_teacher_solves_every_task(episodes):
    for split, eps in episodes.items():
        failed = [(e.task.id, e.verdict.reason, e.error) for e in eps if not e.verdict.ok]
        assert not failed, f"{split}: {failed[:3]}"
        none = [e for e in eps if e.task.family == "none"]
        assert 0.05 * N_TASKS < len(none) < 0.3 * N_TASKS
        for e in none:
            assert not any(m.get("tool_calls", [{}])[0].get("function", {}).get("name") == "buy"
                           for m in e.messages if m.get("tool_calls"))


def test_teacher_solves_every_task_with_faults_and_mistakes():
    wf = load_workflow("shop", fault_rate=0.1, mistake_rate=0.3)
    n_mistakes = 0
    for split in SPLITS:
        for i in range(100):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
            for k, m in enumerate(ep.messages):
                if m.get("weight") == 0:
                    n_mistakes += 1
                    assert "is not available" in ep.messages[k + 1]["content"]
                    wrong = json.loads(m["tool_calls"][0]["function"]["arguments"])["size"]
                    assert wrong in ep.messages[k + 2]["reasoning"]
    assert n_mistakes > 20


def test_splits_share_no_kinds_attributes_or_colors(episodes):
    for name in ("noun", "adjective", "material", "color"):
        train, test = set(pool(name, "train", 0.3)), set(pool(name, "test", 0.3))
        assert train and test and not train & test, name
    for i in range(20):
        for p in build_catalogue(seed_of("test", i), "test", 0.3):
            assert p.noun in pool("noun", "test", 0.3) and set(p.colors) <= set(pool("color", "test", 0.3))
    assert sum(e.task.heldout == "template" for e in episodes["test"]) > 20
    assert all(e.task.heldout == "seen" for e in episodes["train"])


def catalogue():
    return [Product("P1", "mug", "slim", "bamboo", 2099, ["red", "teal"], ["S", "L"], 4.0),
            Product("P2", "mug", "slim", "cotton", 1500, ["red"], ["M"], 4.5),
            Product("P3", "scarf", "cozy", "wool", 3000, ["grey"], ["S"], 3.0)]


def test_tools():
    env = ShopEnv(catalogue())
    assert env.call("search", {"query": "slim mug"}).text.splitlines() == [
        "P2 | Slim cotton mug | $15.00", "P1 | Slim bamboo mug | $20.99"]  # same score: better rating first
    assert env.call("search", {"query": "wool"}).text == "P3 | Cozy wool scarf | $30.00"
    assert env.call("search", {"query": "zzz"}).text == "(no results)"
    assert "size: S, L" in env.call("view", {"product_id": "P1"}).text
    for args, msg in (({"product_id": "P9", "color": "red", "size": "S"}, "no product with id"),
                      ({"product_id": "P1", "color": "blue", "size": "S"}, "color 'blue' is not available"),
                      ({"product_id": "P1", "color": "red", "size": "M"}, "size 'M' is not available")):
        obs = env.call("buy", args)
        assert obs.kind == "tool_error" and msg in obs.text
    assert env.orders == []
    assert env.call("buy", {"product_id": "P1", "color": "teal", "size": "L"}).ok
    assert env.orders == [("P1", {"color": "teal", "size": "L"})]
    assert env.call("search", {"query": "  "}).kind == "tool_error"


def test_request_matching():
    p = catalogue()[0]
    assert Request("mug", "slim", None, "red", "S", 2099).matches(p)
    assert not Request("mug", "slim", None, "red", "S", 2098).matches(p)  # over budget by a cent
    assert not Request("mug", "slim", "cotton", "red", "S", 5000).matches(p)
    assert not Request("mug", "slim", None, "blue", "S", 5000).matches(p)
    assert not Request("mug", "cozy", None, "red", "S", 5000).matches(p)


def test_checker(wf, episodes):
    buy = next(e for e in episodes["test"] if e.task.family == "buy")
    none = next(e for e in episodes["test"] if e.task.family == "none")
    env = wf.make_env(buy.task)
    assert not wf.check(buy.task, env, "done").ok  # nothing bought
    pid = buy.task.gold["matching"][0]
    p = env.products[pid]
    other = next(c for c in p.colors + ["none"] if c != buy.task.gold["color"])
    if other in p.colors:
        env.orders = [(pid, {"color": other, "size": buy.task.gold["size"]})]
        assert not wf.check(buy.task, env, "done").ok
    wrong = next(i for i in env.products if i not in buy.task.gold["matching"])
    env.orders = [(wrong, {"color": buy.task.gold["color"], "size": buy.task.gold["size"]})]
    assert "does not meet" in wf.check(buy.task, env, "done").reason
    env.orders = [(pid, {"color": buy.task.gold["color"], "size": buy.task.gold["size"]})]
    assert wf.check(buy.task, env, "done").ok
    env.orders *= 2
    assert not wf.check(buy.task, env, "done").ok  # bought twice
    env = wf.make_env(none.task)
    assert wf.check(none.task, env, "Sorry, no product matches.").ok
    assert not wf.check(none.task, env, "Here you go.").ok
    env.orders = [(next(iter(env.products)), {"color": "x", "size": "S"})]
    assert not wf.check(none.task, env, "No product matches.").ok
