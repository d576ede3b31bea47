"""The workflow protocol: tool schemas, argument validation, splits, the teacher driver."""
from typing import Literal, Optional

import pytest

from tests.fake_workflow import CalcWorkflow
from agentc.workflows.base import (Call, Environment, Mistake, ToolError, heldout_templates, load_workflow, run_teacher,
                                   split_pool, stable_hash, task_seed, tool, tool_manifest)


class Env(Environment):
    def __init__(self):
        self.log = []

    @tool
    def search(self, query: str, limit: int = 5, exact: bool = False, tags: Optional[list[str]] = None,
               order: Literal["asc", "desc"] = "asc", weight: float = 1.0) -> list:
        """Search the catalogue for items.

        Matches are ranked by relevance.

        Args:
            query: Words to look for.
            limit: How many results
                to return at most.
            exact: Only exact matches.
            tags: Restrict to these tags.
            order: Sort order.
            weight: A ranking weight.

        Returns:
            A list of item names.
        """
        self.log.append(query)
        if query == "fail":
            raise ToolError("the catalogue is closed")
        if query == "bug":
            return 1 / 0
        return [query] * min(limit, 2)


def test_schema_from_hints_and_docstring():
    (t,) = Env().tools()
    s = t.schema()
    assert s["type"] == "function" and s["function"]["name"] == "search"
    assert s["function"]["description"].startswith("Search the catalogue for items.\nMatches are ranked")
    assert "Returns:" in s["function"]["description"]
    p = s["function"]["parameters"]
    assert p["required"] == ["query"] and p["additionalProperties"] is False
    props = p["properties"]
    assert props["query"] == {"type": "string", "description": "Words to look for."}
    assert props["limit"] == {"type": "integer", "description": "How many results to return at most.", "default": 5}
    assert props["exact"]["type"] == "boolean" and props["weight"]["type"] == "number"
    assert props["order"]["enum"] == ["asc", "desc"]
    assert props["tags"]["anyOf"] == [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    assert "search(query: string, limit?: integer" in tool_manifest([t])


def test_tool_definition_errors_are_clear():
    with pytest.raises(ValueError, match="needs a docstring"):
        tool(lambda x: x)
    with pytest.raises(ValueError, match="'b' is not documented"):
        @tool
        def f(a: int, b: int) -> int:
            """Add.

            Args:
                a: first.
            """
    with pytest.raises(TypeError, match="needs a type hint"):
        @tool
        def g(a) -> int:
            """G.

            Args:
                a: thing.
            """
    with pytest.raises(TypeError, match="unsupported type hint"):
        @tool
        def h(a: set) -> int:
            """H.

            Args:
                a: thing.
            """
    with pytest.raises(ValueError, match="do not exist"):
        @tool
        def k(a: int) -> int:
            """K.

            Args:
                a: thing.
                zz: ghost.
            """


def test_call_validates_and_never_raises():
    env = Env()
    assert env.call("search", {"query": "lamp", "limit": 3}).value == ["lamp", "lamp"]
    assert env.call("search", {"query": "lamp"}).text == '["lamp", "lamp"]'
    bad = [{"query": 3}, {}, {"query": "x", "limit": "2"}, {"query": "x", "colour": "red"},
           {"query": "x", "limit": True}, {"query": "x", "order": "sideways"}, ["x"]]
    for args in bad:
        obs = env.call("search", args)
        assert obs.kind == "bad_arguments" and obs.text.startswith("Error: invalid arguments for search"), args
    assert env.log == ["lamp", "lamp"]  # invalid calls never reached the tool
    assert env.call("searhc", {"query": "x"}).kind == "unknown_tool"
    assert "Available tools: search" in env.call("searhc", {}).text
    obs = env.call("search", {"query": "fail"})
    assert obs.kind == "tool_error" and obs.text == "Error: the catalogue is closed" and not obs.ok
    assert env.call("search", {"query": "bug"}).kind == "crash"


def test_long_observations_are_cut_visibly():
    class Big(Environment):
        @tool
        def dump(self) -> str:
            """Dump everything."""
            return "x" * 10_000
    obs = Big().call("dump", {})
    assert len(obs.text) < 4100 and obs.text.endswith("[cut: 6000 more characters]")


def test_split_pool_is_disjoint_stable_and_order_free():
    pool = [f"name{i}" for i in range(50)]
    train, test = split_pool(pool, "train", 0.3), split_pool(pool, "test", 0.3)
    assert not set(train) & set(test) and set(train) | set(test) == set(pool)
    assert len(test) == 15
    assert split_pool(list(reversed(pool)), "test", 0.3) == list(reversed(test))
    assert split_pool(pool, "test", 0.3, salt="other") != test  # salts give independent partitions
    nums = split_pool(list(range(1, 100)), "test", 0.5)
    assert len(nums) in (49, 50) and not set(nums) & set(split_pool(list(range(1, 100)), "train", 0.5))
    with pytest.raises(ValueError, match="unknown split"):
        split_pool(pool, "val", 0.3)
    with pytest.raises(ValueError, match="distinct"):
        split_pool(["a", "a"], "train", 0.3)


def test_heldout_templates():
    templates = ["How many {x}?", "Count {x}.", "Number of {x}?", "Tell me how many {x}."]
    held = heldout_templates(templates, 0.25)
    assert len(held) == 1 and held == heldout_templates(templates, 0.25)
    assert heldout_templates(templates, 0.0) == set()
    assert len(heldout_templates(templates, 0.99)) == 3  # always keeps one for training


def test_seeds_are_stable():
    assert stable_hash("a", 1) == stable_hash("a", 1) != stable_hash("a", 2)
    seeds = {task_seed(0, "sql", s, i, a) for s in ("train", "test") for i in range(100) for a in range(3)}
    assert len(seeds) == 600


def test_run_teacher_reports_failures_instead_of_raising():
    wf = CalcWorkflow()
    ok = [i for i in range(40) if task_seed(0, "calc", "train", i) % 4 in (0, 3)][0]
    task = wf.sample_task("train", ok, task_seed(0, "calc", "train", ok))
    ep = run_teacher(wf, task)
    assert ep.verdict.ok and ep.answer == str(task.gold["value"])
    roles = [m["role"] for m in ep.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert ep.messages[2]["tool_calls"][0]["id"] == ep.messages[3]["tool_call_id"] == "call_0"

    class Buggy(CalcWorkflow):
        def teacher(self, task, env):
            yield Call("add", {"a": 1, "b": 2})
            raise KeyError("oops")

    class Silent(CalcWorkflow):
        def teacher(self, task, env):
            yield Call("add", {"a": 1, "b": 2})

    class Looping(CalcWorkflow):
        def teacher(self, task, env):
            while True:
                yield Call("add", {"a": 1, "b": 2})

    assert run_teacher(Buggy(), task).verdict.reason.startswith("teacher_error: KeyError")
    assert run_teacher(Silent(), task).verdict.reason.startswith("no_answer")
    ep = run_teacher(Looping(), task, max_steps=5)
    assert not ep.verdict.ok and len(ep.observations) == 5


def test_deliberate_mistakes_come_first_untrained_and_must_fail():
    """With mistake_rate 1, every call the workflow knows a mistake for is preceded by it: sent,
    its error observed, weight 0; the real call then carries the recovery reasoning. A mistake
    the tool accepts would change the world unseen: it is a teacher error."""
    class Slips(CalcWorkflow):
        def mistake(self, task, env, call, rng):
            return Mistake(Call("add", {"a": "one", "b": 2}, call.reasoning), "a must be a number.")

    class Harmful(CalcWorkflow):
        def mistake(self, task, env, call, rng):
            return Mistake(Call("add", {"a": 0, "b": 0}), "oops")

    ok = [i for i in range(40) if task_seed(0, "calc", "train", i) % 4 in (0, 3)][0]
    task = CalcWorkflow().sample_task("train", ok, task_seed(0, "calc", "train", ok))
    ep = run_teacher(Slips(mistake_rate=1.0), task)
    assert ep.verdict.ok
    roles = [(m["role"], m.get("weight", 1)) for m in ep.messages]
    assert roles == [("system", 1), ("user", 1), ("assistant", 0), ("tool", 1), ("assistant", 1), ("tool", 1),
                     ("assistant", 1)]
    assert ep.messages[3]["content"].startswith("Error:") and ep.messages[4]["reasoning"] == "a must be a number."
    assert run_teacher(Slips(mistake_rate=0.0), task).messages == run_teacher(CalcWorkflow(), task).messages
    assert run_teacher(Harmful(mistake_rate=1.0), task).verdict.reason.startswith("teacher_error: RuntimeError")
    with pytest.raises(ValueError, match="mistake_rate"):
        CalcWorkflow(mistake_rate=1.5)


def test_transient_faults_are_retried_trained_and_change_nothing():
    """With fault_rate 1, every call meets MAX_CONSECUTIVE_FAULTS transient errors first: the same
    call, answered by a fault text instead of the tool (so a modifying call runs once), then
    retried with the retry reasoning; all trained. Rate 0 changes nothing; faults are seeded."""
    from agentc.workflows.base import MAX_CONSECUTIVE_FAULTS, TRANSIENT_FAULTS
    task = CalcWorkflow().sample_task("train", 3, task_seed(0, "calc", "train", 3))
    plain = run_teacher(CalcWorkflow(), task)
    ep = run_teacher(CalcWorkflow(fault_rate=1.0), task)
    assert ep.verdict.ok and ep.answer == plain.answer
    calls = [m for m in ep.messages if m.get("tool_calls")]
    results = [m for m in ep.messages if m["role"] == "tool"]
    n_real = sum(1 for m in plain.messages if m.get("tool_calls"))
    assert len(calls) == n_real * (MAX_CONSECUTIVE_FAULTS + 1) and all("weight" not in m for m in ep.messages)
    fault_texts, retry_texts = {t for t, _ in TRANSIENT_FAULTS}, {r for _, r in TRANSIENT_FAULTS}
    for i in range(0, len(calls), MAX_CONSECUTIVE_FAULTS + 1):
        group = calls[i:i + MAX_CONSECUTIVE_FAULTS + 1]
        assert len({dump(m["tool_calls"][0]["function"]) for m in group}) == 1  # the same call each time
        assert all(results[j]["content"] in fault_texts for j in range(i, i + MAX_CONSECUTIVE_FAULTS))
        assert results[i + MAX_CONSECUTIVE_FAULTS]["content"] not in fault_texts
        assert all(m["reasoning"] in retry_texts for m in group[1:])
    assert [o.kind for o in ep.observations].count("transient") == n_real * MAX_CONSECUTIVE_FAULTS
    assert run_teacher(CalcWorkflow(fault_rate=0.0), task).messages == plain.messages
    some = CalcWorkflow(fault_rate=0.4)
    assert run_teacher(some, task).messages == run_teacher(some, task).messages
    with pytest.raises(ValueError, match="fault_rate"):
        CalcWorkflow(fault_rate=-0.1)


def dump(function: dict) -> str:
    return function["name"] + function["arguments"]


def test_load_workflow():
    assert isinstance(load_workflow("tests.fake_workflow"), CalcWorkflow)
    with pytest.raises(ValueError, match="no workflow named 'nope'"):
        load_workflow("nope")
    with pytest.raises(ValueError, match="test_share"):
        load_workflow("tests.fake_workflow", test_share=1.5)


def test_environment_is_closed_after_every_episode():
    closed = []

    class Closing(CalcWorkflow):
        def make_env(self, task):
            env = super().make_env(task)
            env.close = lambda: closed.append(task.index)
            return env

        def teacher(self, task, env):
            if task.index == 1:
                raise ValueError("teacher bug")
            yield from super().teacher(task, env)

    wf = Closing()
    for i in range(3):
        run_teacher(wf, wf.sample_task("train", i, task_seed(0, "calc", "train", i)))
    assert closed == [0, 1, 2]


def test_subclasses_replace_or_remove_tools():
    class Sub(Env):
        @tool
        def search(self, query: str) -> str:
            """Search differently.

            Args:
                query: Words.
            """
            return "sub"

    class NoSearch(Env):
        def search(self, query):  # a plain method: no longer a tool
            return "hidden"

    assert Sub().call("search", {"query": "x"}).text == "sub"
    assert Sub().tools()[0].description == "Search differently."
    assert NoSearch().tools() == [] and NoSearch().call("search", {"query": "x"}).kind == "unknown_tool"


def test_nullable_parameters_and_unencodable_results():
    class E(Environment):
        @tool
        def f(self, a: int | str | None, n: int = None) -> object:
            """F.

            Args:
                a: A number, a word or null.
                n: Optional count.
            """
            return {1, 2} if a == "set" else [a, n]

    e = E()
    assert e.call("f", {"a": None, "n": None}).text == "[null, null]"
    assert e.call("f", {"a": 1.5}).kind == "bad_arguments"
    assert e.call("f", {"a": "set"}).kind == "crash"  # a set is not JSON: the tool's bug, reported
