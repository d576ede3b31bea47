"""The SQL workflow: the teacher solves every task after exploring the schema, the splits are disjoint,
the tools behave (errors, limits, runaway queries) and the checker rejects wrong answers and states."""
import json
import re
from collections import Counter

import pytest

from agentc.workflows import sql_shop
from agentc.workflows.base import SPLITS, heldout_templates, load_workflow, run_teacher
from agentc.workflows.sql import FAMILIES
from agentc.workflows.sql_shop import CATEGORIES, POOLS, entity_pool
from tests.workflow_helpers import assert_same_digest_in_another_process, calls, seeds, workflow_fixtures

N_TASKS = 160  # per split; the first 160 train tasks hold the 6 of each modifying family test_modifying_gold_* takes
seed_of = seeds("sql")
wf, episodes = workflow_fixtures("sql", N_TASKS)


def tasks_of(episodes, family, n=1, split="train"):
    tasks = [ep.task for ep in episodes[split] if ep.task.family == family][:n]
    assert len(tasks) == n, f"fewer than {n} {family} tasks in the {split} episodes"
    return tasks


def pool(name, split):
    return set(entity_pool(name, split, 0.3))


# ----------------------------------------------------------------------------- the teacher

def test_teacher_solves_every_task(episodes):
    for split, eps in episodes.items():
        failed = [(e.task.id, e.task.family, e.verdict.reason) for e in eps if not e.verdict.ok]
        assert not failed, f"{split}: {failed[:5]}"
        assert not [e.task.id for e in eps if e.crashed]
        assert {e.task.family for e in eps} == set(FAMILIES), f"{split}: some family never drawn"
    modifying = {e.task.family for e in episodes["train"] if e.task.gold["kind"] == "state"}
    assert modifying == {f for f, fam in FAMILIES.items() if fam.modifies} and len(modifying) >= 2
    assert len(FAMILIES) >= 12 and all(3 <= len(fam.templates) <= 4 for fam in FAMILIES.values())


@pytest.mark.slow
def test_teacher_solves_the_tasks_after_the_fast_ones(wf):
    """Tasks N_TASKS..299 of each split, which the fast run's episodes stop short of."""
    for split in SPLITS:
        for i in range(N_TASKS, 300):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok and not ep.crashed, (split, i, ep.task.family, ep.verdict.reason)


def test_teacher_solves_every_task_with_faults_and_mistakes():
    """Transient tool errors and deliberate mistakes at 10% each: the teacher still solves every
    task, modifying ones included (a faulted call never ran, a retried one ran once)."""
    wf = load_workflow("sql", fault_rate=0.1, mistake_rate=0.1)
    n_faults = 0
    for split, n in (("train", 120), ("test", 60)):
        for i in range(n):
            ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
            assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
            n_faults += sum(o.kind == "transient" for o in ep.observations)
    assert n_faults > 50


def test_deliberate_mistakes_are_untrained_rejected_and_fixed():
    """With mistake_rate, the teacher sometimes first sends a name from another schema: the tool
    rejects it (no row changes: modifying tasks still end in the gold state), the message carries
    weight 0, and the next call is the correct one, opened by a reasoning that names both."""
    wf = load_workflow("sql", mistake_rate=0.3)
    kinds, n = set(), 0
    for i in range(120):
        ep = run_teacher(wf, wf.sample_task("train", i, seed_of("train", i)))
        assert ep.verdict.ok, (ep.task.id, ep.verdict.reason, ep.error)
        msgs = ep.messages
        for k, m in enumerate(msgs):
            if m.get("weight") != 0:
                continue
            n += 1
            wrong, fix = m["tool_calls"][0]["function"], msgs[k + 2]["tool_calls"][0]["function"]
            assert msgs[k + 1]["content"].startswith("Error:") and wrong["name"] == fix["name"]
            assert wrong["arguments"] != fix["arguments"] and "weight" not in msgs[k + 2]
            kinds.add(wrong["name"])
            (a,), (b,) = json.loads(wrong["arguments"]).values(), json.loads(fix["arguments"]).values()
            (w,) = Counter(re.findall(r"\w+", a)) - Counter(re.findall(r"\w+", b))  # the wrong name
            assert w in msgs[k + 2]["reasoning"]
    assert n > 60 and kinds == {"describe_table", "run_sql"}
    # the same tasks without mistakes: the same answers
    plain = load_workflow("sql")
    assert all(run_teacher(plain, plain.sample_task("train", i, seed_of("train", i))).verdict.ok for i in range(20))


@pytest.mark.parametrize("test_share", [0.1, pytest.param(0.6, marks=pytest.mark.slow)])
def test_other_test_shares_still_work(test_share):
    """--test-share shrinks one side's pools; databases and questions must still come out solvable."""
    wf = load_workflow("sql", test_share=test_share)
    for split in SPLITS:
        eps = [run_teacher(wf, wf.sample_task(split, i, seed_of(split, i))) for i in range(40)]
        assert all(ep.verdict.ok for ep in eps), [ep.verdict.reason for ep in eps if not ep.verdict.ok][:3]


def test_teacher_explores_the_schema_before_querying(episodes):
    for ep in episodes["train"][:100] + episodes["test"][:100]:
        names = [name for name, _ in calls(ep)]
        first_sql = names.index("run_sql")
        assert names[0] == "list_tables" and names[1] == "describe_table"
        assert set(names[1:first_sql]) == {"describe_table"} and "describe_table" not in names[first_sql:]
        listed = ep.observations[0].text.split("\n")
        assert all(args["table"] in listed for name, args in calls(ep) if name == "describe_table")
        assert all(m.get("reasoning") for m in ep.messages if m["role"] == "assistant")


def test_answers_are_read_from_the_last_observation(episodes):
    for ep in episodes["train"]:
        if ep.task.gold["kind"] != "state":
            last = ep.observations[-1].text
            assert all(part.strip() in last for part in ep.answer.split(","))
        else:
            assert ep.answer.startswith("Done:")


def test_reasoning_is_varied(episodes):
    first_steps = {ep.messages[2]["reasoning"] for ep in episodes["train"]}
    describes = {m["reasoning"] for ep in episodes["train"] for m in ep.messages[3:5] if m.get("reasoning")}
    assert len(first_steps) >= 4 and len(describes) >= 20


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_task_and_messages(wf):
    a = wf.sample_task("train", 3, seed_of("train", 3))
    ep_a = run_teacher(wf, a)
    sql_shop.build_shop.cache_clear()  # rebuild from scratch, not from the cache
    b = wf.sample_task("train", 3, seed_of("train", 3))
    assert a.to_dict() == b.to_dict() and run_teacher(wf, b).messages == ep_a.messages
    assert wf.make_env(a).state_hash() == wf.make_env(b).state_hash()
    others = [wf.sample_task("train", i, seed_of("train", i)) for i in range(4, 14)]
    assert len({t.prompt for t in others + [a]}) >= 9
    assert len({wf.make_env(t).state_hash() for t in others + [a]}) == 11


def test_deterministic_across_processes(wf):
    """Nothing may depend on set iteration order (PYTHONHASHSEED) or on the process."""
    assert_same_digest_in_another_process("sql", "train", 20, hash_seed="12345", wf=wf)


# ----------------------------------------------------------------------------- splits

def test_pools_are_large_and_split_disjointly():
    sizes = {"first": 60, "last": 60, "city": 30, "category": 12, "adjective": 30}
    for name, values in POOLS.items():
        train, test = pool(name, "train"), pool(name, "test")
        assert train and test and not train & test and len(train | test) == len(values)
        assert len(values) >= sizes.get(name, 0)
        assert not any("," in str(v) or "'" in str(v) for v in values)
    nouns = [n for ns in CATEGORIES.values() for n in ns]
    assert len(nouns) == len(set(nouns)), "a noun in two categories would leak products across splits"


def _db_entities(env):
    s, q = env.shop.schema, lambda sql_: [r[0] for r in env.conn.execute(sql_)]
    c = s.t["customers"]
    if s.split_names:
        firsts = q(f"SELECT {s.col['customers', 'first']} FROM {c}")
        lasts = q(f"SELECT {s.col['customers', 'last']} FROM {c}")
    else:
        full = q(f"SELECT {s.col['customers', 'full']} FROM {c}")
        firsts, lasts = [f.split()[0] for f in full], [f.split()[1] for f in full]
    cities = q(f"SELECT {s.col['customers', 'city']} FROM {c}")
    categories = q(f"SELECT {s.col['categories', 'name']} FROM {s.t['categories']}") if s.category_table else \
        q(f"SELECT {s.col['products', 'category']} FROM {s.t['products']}")
    products = q(f"SELECT {s.col['products', 'name']} FROM {s.t['products']}")
    return {"first": set(firsts), "last": set(lasts), "city": set(cities), "category": set(categories),
            "adjective": {p.split()[0] for p in products}}


@pytest.mark.parametrize("n", [60, pytest.param(150, marks=pytest.mark.slow)])
def test_databases_and_questions_use_only_their_split_values(wf, n):
    for split, other in (("test", "train"), ("train", "test")):
        for i in range(n):
            task = wf.sample_task(split, i, seed_of(split, i))
            for name, values in _db_entities(wf.make_env(task)).items():
                # train shops mix invented names into their pools (never a real value of any split)
                real = values - invented(values) if split == "train" else values
                assert real <= pool(name, split) and not values & pool(name, other), (task.id, name)
            p = task.params
            checks = {"city": p.get("city"), "category": p.get("category"), "year": p.get("year"),
                      "more_than": p.get("k"), "percent": p.get("pct"), "stock": p.get("n")}
            if "customer" in p:
                checks["first"], checks["last"] = p["customer"].split()
            months = [p[key][:7] for key in ("date", "start", "end") if key in p]
            for name, value in list(checks.items()) + [("month", m) for m in months]:
                if value is not None and not (split == "train" and invented({value})):
                    assert value in pool(name, split) and value not in pool(name, other), (task.id, name, value)


def invented(values) -> set:
    """The values that are in no real pool (made up by sql_shop.invent_words)."""
    return {v for v in values if str(v).casefold() not in sql_shop.TAKEN}


def test_train_shops_mix_in_invented_names_and_test_shops_never_do(wf):
    shares, test_invented = {}, set()
    for split in ("train", "test"):
        for i in range(40):
            env = wf.make_env(wf.sample_task(split, i, seed_of(split, i)))
            for name, values in _db_entities(env).items():
                if split == "train":
                    shares.setdefault(name, []).append(len(invented(values)) / len(values))
                else:
                    test_invented |= invented(values)
            env.close()
    for name, s in shares.items():  # in a train shop, about half of every kind of name is made up
        assert 0.3 < sum(s) / len(s) < 0.7, (name, sum(s) / len(s))
    assert not test_invented
    # the test split does not depend on the setting: same databases and questions with none invented
    plain = load_workflow("sql", invented=0.0)
    for i in range(10):
        a, b = (w.sample_task("test", i, seed_of("test", i)) for w in (wf, plain))
        assert (a.prompt, a.gold) == (b.prompt, b.gold)
        assert wf.make_env(a).state_hash() == plain.make_env(b).state_hash()
    env = plain.make_env(plain.sample_task("train", 0, seed_of("train", 0)))
    assert not any(invented(v) for v in _db_entities(env).values())
    with pytest.raises(ValueError, match="invented"):
        load_workflow("sql", invented=1.0)


def test_heldout_templates_only_in_test(episodes, wf):
    held = {f: heldout_templates(list(fam.templates), wf.heldout_template_share, salt=f)
            for f, fam in FAMILIES.items()}
    assert all(held.values())
    for ep in episodes["train"]:
        assert ep.task.heldout == "seen" and ep.task.params["template"] not in held[ep.task.family]
    test_tasks = [ep.task for ep in episodes["test"]]
    assert all((t.heldout == "template") == (t.params["template"] in held[t.family]) for t in test_tasks)
    assert sum(t.heldout == "template" for t in test_tasks) >= 20


# ----------------------------------------------------------------------------- databases

def test_databases_are_large_and_schemas_vary(wf):
    customer_tables, price_columns, name_styles = set(), set(), set()
    for i in range(30):
        env = wf.make_env(wf.sample_task("train", i, seed_of("train", i)))
        s = env.shop.schema
        counts = {t: env.conn.execute(f"SELECT COUNT(*) FROM {s.t[t]}").fetchone()[0] for t in s.cols}
        assert counts["customers"] >= 70 and counts["orders"] >= 200 and counts["order_items"] >= 250
        assert sum(counts.values()) >= 600
        customer_tables.add(s.t["customers"])
        price_columns.add(s.col["products", "price"])
        name_styles.add((s.split_names, s.category_table))
        dates = [r[0] for r in env.conn.execute(f"SELECT {s.col['orders', 'date']} FROM {s.t['orders']}")]
        assert all(len(d) == 10 and d[4] == d[7] == "-" for d in dates)
    assert len(customer_tables) == 3 and len(price_columns) == 3 and len(name_styles) == 4


# ----------------------------------------------------------------------------- tools

def test_tools(wf):
    task = wf.sample_task("train", 0, seed_of("train", 0))
    env = wf.make_env(task)
    s = env.shop.schema
    orders = s.t["orders"]
    for t in env.tools():
        assert t.description
        assert all(p.get("description") for p in t.parameters["properties"].values())
    assert env.call("list_tables", {}).text.split("\n") == sorted(s.t[t] for t in s.cols)
    described = env.call("describe_table", {"table": orders})
    assert described.ok and "PRIMARY KEY" in described.text and f"REFERENCES {s.t['customers']}" in described.text
    unknown = env.call("describe_table", {"table": "nope"})
    assert unknown.kind == "tool_error" and s.t["customers"] in unknown.text
    for query in ["SELEC 1", "SELECT * FROM nope", "SELECT 1; SELECT 2", "", "ATTACH DATABASE ':memory:' AS x",
                  "DETACH DATABASE main", "PRAGMA foreign_keys = ON", f"DROP TABLE {orders}", "BEGIN"]:
        assert env.call("run_sql", {"query": query}).kind == "tool_error", query
    for query in ["WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
                  f"SELECT COUNT(*) FROM {orders} a, {orders} b, {orders} c, {orders} d"]:
        obs = env.call("run_sql", {"query": query})
        assert obs.kind == "tool_error" and "too long" in obs.text
    assert env.call("run_sql", {"query": f"PRAGMA table_info({orders})"}).ok
    assert env.call("run_sql", {"query": 3}).kind == "bad_arguments"
    assert env.call("run_sql", {}).kind == "bad_arguments"
    assert env.call("describe_table", {"table": "x", "extra": 1}).kind == "bad_arguments"

    n = len(env.shop.orders)
    rows = env.call("run_sql", {"query": f"SELECT * FROM {orders}"}).text.split("\n")
    assert len(rows) == 1 + 30 + 1 and rows[-1] == f"(... {n - 30} more rows)"
    assert env.call("run_sql", {"query": "SELECT 1.0 / 3 AS x, NULL AS y"}).text == "x | y\n0.33 | NULL"
    status = s.col["orders", "status"]
    pending = sum(o.status == "pending" for o in env.shop.orders)
    update = env.call("run_sql", {"query": f"UPDATE {orders} SET {status} = 'lost' WHERE {status} = 'pending'"})
    assert update.text == f"OK: {pending} rows affected."
    lost = env.call("run_sql", {"query": f"SELECT COUNT(*) FROM {orders} WHERE {status} = 'lost'"})
    assert lost.text.endswith(f"\n{pending}")  # committed: a later call sees it


# ----------------------------------------------------------------------------- checker

def test_checker_numbers_text_lists(wf, episodes):
    ok = lambda task, answer: wf.check(task, None, answer).ok  # noqa: E731  (answer tasks ignore the env)
    (count,) = tasks_of(episodes, "city_count")
    v = count.gold["value"]
    assert ok(count, str(v)) and ok(count, f"{v}.") and not ok(count, str(v + 1)) and not ok(count, "many")
    (spend,) = tasks_of(episodes, "customer_spend")
    v = spend.gold["value"]
    assert ok(spend, f"{v:.2f}") and ok(spend, f"${v:,.2f}") and ok(spend, str(v))
    assert not ok(spend, f"{v + 0.01:.2f}") and not ok(spend, f"{v * 1.1:.2f}")
    (top,) = tasks_of(episodes, "top_customer")
    assert ok(top, top.gold["value"].lower() + ".") and not ok(top, "Ada Lovelace")
    (top3,) = tasks_of(episodes, "top3_products")
    names = top3.gold["value"]
    assert ok(top3, ", ".join(names)) and not ok(top3, ", ".join(reversed(names)))
    assert not ok(top3, ", ".join(names[:2]))
    for low in tasks_of(episodes, "low_stock", n=10):
        names = low.gold["value"]
        assert ok(low, ", ".join(reversed(names))) and not ok(low, ", ".join(names + ["Red Kettle"]))
        assert not ok(low, ", ".join(names[1:]) or "nothing")


def test_checker_rejects_wrong_final_states(wf, episodes):
    def state_after(task, *queries):
        env = wf.make_env(task)
        for q in queries:
            assert env.call("run_sql", {"query": env.shop.schema.fmt(q)}).ok, q
        return wf.check(task, env, "Done.")

    (raise_task,) = tasks_of(episodes, "raise_prices")
    pct = raise_task.params["pct"]
    assert not state_after(raise_task).ok  # nothing done
    assert not state_after(raise_task, f"UPDATE {{products}} SET {{products.price}} = ROUND({{products.price}} * "
                                       f"{1 + (pct + 1) / 100}, 2)").ok  # wrong rate, every category
    (cancel_task,) = tasks_of(episodes, "cancel_pending")
    assert not state_after(cancel_task, "UPDATE {orders} SET {orders.status} = 'cancelled' "
                                        "WHERE {orders.status} = 'pending'").ok  # ignores the date
    (add_task,) = tasks_of(episodes, "add_customer")
    assert not state_after(add_task).ok
    (delete_task,) = tasks_of(episodes, "delete_cancelled")
    assert not state_after(delete_task, "DELETE FROM {orders} WHERE {orders.status} = 'cancelled'").ok


def _independent_sql(task, s):
    """Each modification written differently from the teacher's plan, straight from the task parameters."""
    p = task.params
    if task.family == "raise_prices":
        where = (f"{{products.category_id}} = (SELECT {{categories.id}} FROM {{categories}} "
                 f"WHERE {{categories.name}} = '{p['category']}')" if s.category_table
                 else f"{{products.category}} = '{p['category']}'")
        return [f"UPDATE {{products}} SET {{products.price}} = "
                f"ROUND({{products.price}} * (100 + {p['pct']}) / 100.0, 2) WHERE {where}"]
    if task.family == "cancel_pending":
        return [f"UPDATE {{orders}} SET {{orders.status}} = 'cancelled' WHERE {{orders.status}} = 'pending' "
                f"AND julianday({{orders.date}}) < julianday('{p['date']}')"]
    if task.family == "add_customer":
        first, last = p["customer"].split()
        cols, vals = ("{customers.first}, {customers.last}", f"'{first}', '{last}'") if s.split_names \
            else ("{customers.full}", f"'{first} {last}'")
        return [f"INSERT INTO {{customers}} ({{customers.id}}, {cols}, {{customers.signup}}, {{customers.city}}) "
                f"SELECT MAX({{customers.id}}) + 1, {vals}, '{p['date']}', '{p['city']}' FROM {{customers}}"]
    who = f"(SELECT c.{{customers.id}} FROM {{customers}} c WHERE {{cname}} = '{p['customer']}')"
    return [f"DELETE FROM {{orders}} WHERE {{orders.status}} = 'cancelled' AND {{orders.customer}} = {who}",
            "DELETE FROM {order_items} WHERE {order_items.order} NOT IN (SELECT {orders.id} FROM {orders})"]


def test_modifying_gold_agrees_with_independent_sql(wf, episodes):
    for family in [f for f, fam in FAMILIES.items() if fam.modifies]:
        for task in tasks_of(episodes, family, n=6) + tasks_of(episodes, family, n=2, split="test"):
            env = wf.make_env(task)
            before = env.state_hash()
            for q in _independent_sql(task, env.shop.schema):
                obs = env.call("run_sql", {"query": env.shop.schema.fmt(q)})
                assert obs.ok and obs.text != "OK: 0 rows affected.", (q, obs.text)
            assert env.state_hash() != before
            assert wf.check(task, env, "Done.").ok, (task.id, family)
