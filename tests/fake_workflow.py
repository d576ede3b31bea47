"""A tiny workflow for tests of the data path: fast, and failing on purpose where asked."""
import random

from agentc.workflows.base import Answer, Call, Environment, Task, Verdict, Workflow, split_pool, tool


class CalcEnv(Environment):
    def __init__(self, seed: int):
        self.memory = random.Random(seed).randint(0, 9)

    @tool
    def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return str(a + b + 0)

    @tool
    def broken(self) -> str:
        """A tool with a bug, to test that crashes are rejected."""
        raise RuntimeError("boom")


class CalcWorkflow(Workflow):
    """Tasks whose seed % 4 == 1 are answered wrongly by the teacher (a rejected attempt); tasks
    with seed % 4 == 2 call the broken tool (a crash)."""
    name = "calc"
    instructions = "You add numbers.  Tabs\tand  spaces — and unicode ünïcödé 🙂 survive."

    def sample_task(self, split, index, seed):
        rng = random.Random(seed)
        a, b = rng.choice(split_pool(list(range(100)), split, self.test_share, "a")), rng.randint(0, 99)
        return Task("calc", split, index, seed, "add", f"What is {a} + {b}?", {"value": a + b}, {"a": a, "b": b})

    def make_env(self, task):
        return CalcEnv(task.seed)

    def teacher(self, task, env):
        a, b = task.params["a"], task.params["b"]
        if task.seed % 4 == 2:
            yield Call("broken", {}, "Let me try the other tool.")
        obs = yield Call("add", {"a": a, "b": b}, f"I add {a} and {b}.\n  Indented line.")
        value = int(obs.text) + (1 if task.seed % 4 == 1 else 0)
        yield Answer(str(value), "The tool told me the sum.")

    def check(self, task, env, answer):
        return Verdict(answer.strip() == str(task.gold["value"]), "wrong sum")


WORKFLOW = CalcWorkflow
