"""The support workflow: the teacher follows the policy in every task (also with faults and
mistakes); the tools enforce what is impossible but not the policy; the scripted user answers only
what it is asked; the checker fails policy breaches, missing facts and unconfirmed changes; the
splits share no names, products or colors."""
import json

from agentc.workflows.base import SPLITS, load_workflow, run_teacher
from agentc.workflows.support import (FAMILIES, WINDOW, Customer, Item, Order, SupportEnv, User, build_db, digest, pool)
from tests.workflow_helpers import calls, seeds, workflow_fixtures

N_TASKS = 200
seed_of = seeds("support")
wf, episodes = workflow_fixtures("support", N_TASKS)


def test_teacher_solves_every_task(episodes):
    for split, eps in episodes.items():
        failed = [(e.task.id, e.verdict.reason, e.error) for e in eps if not e.verdict.ok]
        assert not failed, f"{split}: {failed[:3]}"
        assert {e.task.family for e in eps} == set(FAMILIES)
        for e in eps:
            assert "@" not in e.task.prompt  # the user gives the email only when asked
            names = [name for name, _ in calls(e, trained_only=True)]
            assert names[:3] == ["ask_user", "find_customer", "get_order"]
            changes = [n for n in names if n in ("cancel_order", "return_item", "exchange_item")]
            if e.task.family in ("status", "cancel_refused", "late", "declined"):
                assert not changes, (e.task.family, names)
            else:  # a change comes right after the customer's yes
                assert len(changes) == 1 and names[-2] == "ask_user"
                assert e.messages[-4]["content"] == "Yes, please go ahead."


def test_teacher_solves_every_task_with_faults_and_mistakes():
    wf = load_workflow("support", fault_rate=0.1, mistake_rate=0.3)
    kinds = set()
    for split in SPLITS:
        for i in range(100):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
            for k, m in enumerate(ep.messages):
                if m.get("weight") == 0:
                    kinds.add(m["tool_calls"][0]["function"]["name"])
                    assert ep.messages[k + 1]["content"].startswith("Error: no ") or "has no item" in ep.messages[k + 1]["content"]
                    right = json.loads(ep.messages[k + 2]["tool_calls"][0]["function"]["arguments"])
                    assert (right.get("email") or right["item_id"]) in ep.messages[k + 2]["reasoning"]
    assert {"find_customer", "return_item", "exchange_item"} <= kinds


def test_splits_share_no_names_products_or_colors(episodes):
    for name in ("first", "last", "product", "color"):
        train, test = set(pool(name, "train", 0.3)), set(pool(name, "test", 0.3))
        assert train and test and not train & test, name
    for i in range(20):
        for c in build_db(seed_of("test", i), "test", 0.3):
            assert c.name.split()[0] in pool("first", "test", 0.3)
            assert all(it.product in pool("product", "test", 0.3) for o in c.orders for it in o.items)
    assert sum(e.task.heldout == "template" for e in episodes["test"]) > 20
    assert all(e.task.heldout == "seen" for e in episodes["train"])


def store():
    orders = [Order("W1", "processing", 0, "", [Item("I1", "kettle", "red", 2500)]),
              Order("W2", "shipped", 0, "1ZABC", [Item("I2", "sandals", "M", 4000)]),
              Order("W3", "delivered", 12, "", [Item("I3", "umbrella", "blue", 1999), Item("I4", "gloves", "S", 1000)]),
              Order("W4", "delivered", 45, "", [Item("I5", "notebook", "teal", 550)])]
    return [Customer("C1", "Ana Lopez", "ana@mail.com", orders),
            Customer("C2", "Bo Chen", "bo@mail.com", [Order("W5", "cancelled", 0, "", [Item("I6", "blender", "red", 9000)])])]


def test_tools():
    env = SupportEnv(store(), User("ana@mail.com", "Help me.", "", True))
    before = digest(env.customers)
    assert env.call("find_customer", {"email": " ANA@mail.com"}).text.splitlines()[2:] == [
        "W1 | processing | kettle", "W2 | shipped | sandals", "W3 | delivered | umbrella, gloves", "W4 | delivered | notebook"]
    text = env.call("get_order", {"order_id": "W3"}).text
    assert "status: delivered 12 days ago" in text and "I4 | gloves | size S | $10.00 | ordered" in text
    assert "total: $29.99" in text
    assert "tracking 1ZABC" in env.call("get_order", {"order_id": "#W2"}).text
    for name, args, msg in (("find_customer", {"email": "an@mail.com"}, "no customer"),
                            ("get_order", {"order_id": "W9"}, "no order"),
                            ("cancel_order", {"order_id": "W3"}, "delivered and cannot be cancelled"),
                            ("cancel_order", {"order_id": "W5"}, "cancelled and cannot be cancelled"),
                            ("return_item", {"order_id": "W1", "item_id": "I1"}, "only delivered items"),
                            ("return_item", {"order_id": "W3", "item_id": "I1"}, "has no item"),
                            ("exchange_item", {"order_id": "W3", "item_id": "I4", "new_value": "XXL"}, "not a size"),
                            ("exchange_item", {"order_id": "W3", "item_id": "I3", "new_value": "plaid"}, "not a color"),
                            ("exchange_item", {"order_id": "W3", "item_id": "I3", "new_value": "Blue"}, "already is")):
        obs = env.call(name, args)
        assert obs.kind == "tool_error" and msg in obs.text, (name, obs.text)
    assert digest(env.customers) == before  # refused calls change nothing
    # the policy is the agent's job: a shipped order can be cancelled, a late item returned
    assert "$40.00 refunded" in env.call("cancel_order", {"order_id": "W2"}).text
    assert "$5.50 refunded" in env.call("return_item", {"order_id": "W4", "item_id": "I5"}).text
    assert env.call("return_item", {"order_id": "W4", "item_id": "I5"}).kind == "tool_error"  # twice
    assert env.call("exchange_item", {"order_id": "W3", "item_id": "I4", "new_value": "l"}).ok
    assert env.orders["W3"].items[1].value == "L" and env.orders["W3"].items[1].state == "exchanged"
    assert digest(env.customers) != before


def test_scripted_user_answers_only_what_is_asked():
    user = User("ana@mail.com", "I want to swap my kettle.", "blue", confirms=False)
    assert user.reply("What's the email address on your account?") == "It's ana@mail.com."
    assert user.reply("Which color would you like instead?") == "blue, please."
    assert user.reply("I can exchange it for blue. Shall I go ahead?").startswith("No")
    assert User("a@b.c", "x", "", True).reply("Should I proceed?").startswith("Yes")
    assert "order number" in user.reply("Do you have the order number?")
    assert user.reply("How are you?") == "Sorry, I'm not sure what you mean. I want to swap my kettle."
    assert "email" not in user.reply("What is your name?")


def test_checker(wf, episodes):
    eps = {e.task.family: e for e in episodes["test"]}
    for family, ep in eps.items():  # the teacher's own answer passes on a fresh env replayed by hand
        env = wf.make_env(ep.task)
        for name, args in calls(ep, trained_only=True):
            if name != "ask_user":
                env.call(name, args)
        assert wf.check(ep.task, env, ep.answer).ok, family
        missing = wf.check(ep.task, env, "Done.")
        assert not missing.ok and "does not tell" in missing.reason
    # a policy breach fails even with the right words: cancelling a shipped or delivered order
    ep = eps["cancel_refused"]
    env = wf.make_env(ep.task)
    oid = next(a["order_id"] for n, a in calls(ep, trained_only=True) if n == "get_order")
    if env.orders[oid].status == "shipped":
        assert env.call("cancel_order", {"order_id": oid}).ok
        assert "gold state" in wf.check(ep.task, env, ep.answer).reason
    # returning a late item, or acting although the customer declined
    for family in ("late", "declined"):
        ep = eps[family]
        env = wf.make_env(ep.task)
        oid = next(a["order_id"] for n, a in calls(ep, trained_only=True) if n == "get_order")
        order = env.orders[oid]
        name = "cancel_order" if order.status == "processing" else "return_item"
        args = {"order_id": oid} | ({} if name == "cancel_order" else {"item_id": order.items[0].id})
        assert env.call(name, args).ok
        assert not wf.check(ep.task, env, ep.answer).ok, family
    # the required facts: refund amounts and the window
    assert any(f.startswith("$") for f in eps["return"].task.gold["facts"])
    assert eps["late"].task.gold["facts"] == [f"{WINDOW} days"]
    assert eps["declined"].task.gold["facts"] == ["no changes"]
