"""Code workflow: write a small Python function, test it in a sandbox, read the failures, fix it.

A task asks for one function of one argument (its name, and a behaviour whose constants are drawn
per task). Tools: show_tests (the visible examples) and test_solution (save solution.py and run
the visible tests in agentc/workflows/sandbox.py: a child process under OS isolation, seccomp and
rlimits, whose outputs are compared here). The checker runs hidden tests, edge cases included, on the last
solution submitted. Twelve families; function names and most constants come from split pools, so a
test task never asks for a train task's function.

The deliberate mistake of this workflow is the classic one: a first version with a typical bug
(`>=` for `>`, a forgotten wrap-around, a set that loses the order) that fails a visible test; the
teacher reads the failure and submits the fix, with a reasoning that quotes the failing case.
Expected values come from a plain Python reference, never from the teacher's code.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable

from agentc.workflows.base import (Answer, Call, Environment, Mistake, Resample, Task, ToolError, Verdict, Workflow,
                                   draw_family, resample, split_pool, tool)
from agentc.workflows.phrasing import Phrasing
from agentc.workflows.sandbox import require, run_tests

VERBS = "pick keep take find get make count total scan select grab collect gather build fold".split()
NOUNS = "items values parts chunks bits entries pieces points marks terms scores tokens cells rows".split()
POOLS = {"name": [f"{v}_{n}" for v in VERBS for n in NOUNS], "k": list(range(2, 21)),
         "letter": list("abcdefghiklmnoprstuw"), "step": list(range(2, 7))}
N_VISIBLE, N_HIDDEN = 4, 10


@functools.lru_cache(maxsize=None)
def pool(name: str, split: str, test_share: float) -> tuple:
    return tuple(split_pool(POOLS[name], split, test_share, salt=f"code-{name}"))


def _ints(rng: random.Random, lo: int, hi: int, n: tuple[int, int] = (0, 8)) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


def _text(rng: random.Random, letters: str = "abcdefghijklmnopqrstuvwxyz", words: tuple[int, int] = (1, 5)) -> str:
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
                    for _ in range(rng.randint(*words)))


@dataclass
class Family:
    """One kind of function. `params` draws the constants; `ref` is the reference (it computes
    every expected value); `code` and `bug` write the teacher's source and its typical wrong
    first version; `fix` explains the difference; `inputs` draws one argument."""
    arg: str
    templates: tuple[str, ...]
    params: Callable[[random.Random, Callable], dict]
    ref: Callable[[dict], Callable[[Any], Any]]
    code: Callable[[dict], str]
    bug: Callable[[dict], str]
    fix: str
    inputs: Callable[[random.Random, dict], Any]


def _k(rng, pool_of):
    return {"k": rng.choice(pool_of("k"))}


FAMILIES: dict[str, Family] = {
    "above": Family(
        "xs", ("Write a Python function `{name}(xs)` that returns the numbers of the list xs that are greater "
               "than {k}, in their original order.",
               "I need `{name}(xs)`: keep only the items of xs bigger than {k}, order unchanged.",
               "Implement `{name}(xs)`, which filters the list xs down to the values strictly above {k}."),
        _k, lambda p: lambda xs: [x for x in xs if x > p["k"]],
        lambda p: f"def {p['name']}(xs):\n    return [x for x in xs if x > {p['k']}]\n",
        lambda p: f"def {p['name']}(xs):\n    return [x for x in xs if x >= {p['k']}]\n",
        "the comparison must be strict, so {k} itself is left out",
        lambda rng, p: _ints(rng, 0, 2 * p["k"]) + [p["k"]] * rng.randint(0, 1)),
    "count_letter": Family(
        "text", ("Write `{name}(text)` returning how many times the letter '{letter}' occurs in text, "
                 "in upper or lower case.",
                 "Implement `{name}(text)`: count the occurrences of '{letter}' in text, ignoring case.",
                 "Create a function `{name}(text)` that counts '{letter}' and '{upper}' in the string text."),
        lambda rng, pool_of: {"letter": (c := rng.choice(pool_of("letter"))), "upper": c.upper()},
        lambda p: lambda text: text.lower().count(p["letter"]),
        lambda p: f"def {p['name']}(text):\n    return text.lower().count('{p['letter']}')\n",
        lambda p: f"def {p['name']}(text):\n    return text.count('{p['letter']}')\n",
        "capital letters count too, so I compare in lower case",
        lambda rng, p: _text(rng, "abcdefghijklmnopqrstuvwxyz" + p["letter"] * 3 + p["upper"] * 3)),
    "multiples_sum": Family(
        "n", ("Write `{name}(n)` that returns the sum of all positive integers below n that are multiples of "
              "{a} or {b}.",
              "Implement `{name}(n)`: add up every number from 1 to n - 1 divisible by {a} or by {b}.",
              "I need a function `{name}(n)` giving the total of the multiples of {a} or {b} smaller than n."),
        lambda rng, pool_of: dict(zip("ab", sorted(rng.sample([2, 3, 5, 7, 11], 2)))),
        lambda p: lambda n: sum(i for i in range(1, n) if i % p["a"] == 0 or i % p["b"] == 0),
        lambda p: f"def {p['name']}(n):\n    return sum(i for i in range(1, n) if i % {p['a']} == 0 "
                  f"or i % {p['b']} == 0)\n",
        lambda p: f"def {p['name']}(n):\n    return sum(i for i in range(1, n + 1) if i % {p['a']} == 0 "
                  f"or i % {p['b']} == 0)\n",
        "n itself must not be counted: the range stops below n",
        lambda rng, p: rng.choice([rng.randint(0, 60), p["a"] * rng.randint(1, 12), p["b"] * rng.randint(1, 12)])),
    "clamp": Family(
        "x", ("Write `{name}(x)` that returns x limited to the range {lo} to {hi}: {lo} if x is smaller, "
              "{hi} if it is larger, x otherwise.",
              "Implement `{name}(x)`, clamping the number x into [{lo}, {hi}].",
              "I need `{name}(x)`: x, but never below {lo} and never above {hi}."),
        lambda rng, pool_of: {"lo": (lo := rng.choice(pool_of("k"))), "hi": lo + rng.randint(3, 30)},
        lambda p: lambda x: max(p["lo"], min(x, p["hi"])),
        lambda p: f"def {p['name']}(x):\n    return max({p['lo']}, min(x, {p['hi']}))\n",
        lambda p: f"def {p['name']}(x):\n    return min(x, {p['hi']})\n",
        "values below {lo} must be raised to {lo} as well",
        lambda rng, p: rng.randint(p["lo"] - 20, p["hi"] + 20)),
    "dedupe": Family(
        "xs", ("Write `{name}(xs)` that returns the list xs without repeated values, keeping the first "
               "occurrence of each, in the original order.",
               "Implement `{name}(xs)`: drop duplicates from xs but keep the order of first appearance.",
               "I need `{name}(xs)` to remove repeated items from xs, first occurrences staying in place."),
        lambda rng, pool_of: {}, lambda p: lambda xs: list(dict.fromkeys(xs)),
        lambda p: f"def {p['name']}(xs):\n    return list(dict.fromkeys(xs))\n",
        lambda p: f"def {p['name']}(xs):\n    return sorted(set(xs))\n",
        "a set loses the order; dict.fromkeys keeps the first occurrences in order",
        lambda rng, p: _ints(rng, 0, 9, (0, 10))),
    "every_nth": Family(
        "xs", ("Write `{name}(xs)` that returns the items of the list xs at positions 0, {step}, {step2}, and so "
               "on (every {step} places, starting with the first).",
               "Implement `{name}(xs)`: take xs[0], then each item {step} places after the previous one.",
               "I need `{name}(xs)` returning the items of xs at positions 0, {step}, {step2}, and so on."),
        lambda rng, pool_of: {"step": (s := rng.choice(pool_of("step"))), "step2": 2 * s},
        lambda p: lambda xs: xs[::p["step"]],
        lambda p: f"def {p['name']}(xs):\n    return xs[::{p['step']}]\n",
        lambda p: f"def {p['name']}(xs):\n    return xs[{p['step'] - 1}::{p['step']}]\n",
        "the first element, at index 0, belongs to the result",
        lambda rng, p: _ints(rng, 0, 99, (0, 15))),
    "rotate": Family(
        "xs", ("Write `{name}(xs)` that returns the list xs rotated left by {k} positions (items wrap around "
               "to the end); an empty list stays empty.",
               "Implement `{name}(xs)`: move the first {k} items of xs to its end, wrapping as often as needed; "
               "[] gives [].",
               "I need `{name}(xs)`, a left rotation of xs by {k} steps that also works for an empty list."),
        _k, lambda p: lambda xs: xs[p["k"] % len(xs):] + xs[:p["k"] % len(xs)] if xs else [],
        lambda p: f"def {p['name']}(xs):\n    if not xs:\n        return []\n    k = {p['k']} % len(xs)\n"
                  f"    return xs[k:] + xs[:k]\n",
        lambda p: f"def {p['name']}(xs):\n    return xs[{p['k']}:] + xs[:{p['k']}]\n",
        "a list shorter than {k} must wrap around, so the shift is taken modulo len(xs) (and [] handled apart)",
        lambda rng, p: _ints(rng, 0, 9, (0, 9))),
    "caesar": Family(
        "text", ("Write `{name}(text)` that shifts every lowercase letter of text {k} places forward in the "
                 "alphabet, wrapping from z back to a; other characters stay as they are.",
                 "Implement `{name}(text)`: a Caesar shift by {k} of the lowercase letters (z wraps to a), "
                 "everything else unchanged.",
                 "I need `{name}(text)` to rotate each letter a-z of text by {k} positions, leaving other "
                 "characters alone."),
        lambda rng, pool_of: {"k": rng.choice([k for k in pool_of("k") if k < 26])},
        lambda p: lambda text: "".join(chr((ord(c) - 97 + p["k"]) % 26 + 97) if "a" <= c <= "z" else c for c in text),
        lambda p: f"def {p['name']}(text):\n    return ''.join(chr((ord(c) - 97 + {p['k']}) % 26 + 97) "
                  f"if 'a' <= c <= 'z' else c for c in text)\n",
        lambda p: f"def {p['name']}(text):\n    return ''.join(chr(ord(c) + {p['k']}) if 'a' <= c <= 'z' "
                  f"else c for c in text)\n",
        "letters near the end of the alphabet must wrap around, hence the modulo 26",
        lambda rng, p: _text(rng, "abcdefghijklmnopqrstuvwxyzxyzwvu.! ")),
    "digit_sum": Family(
        "n", ("Write `{name}(n)` that returns the sum of the decimal digits of the integer n plus {k}; for a "
              "negative n, ignore the sign.",
              "Implement `{name}(n)`: add up the digits of n (its absolute value), then add {k}.",
              "I need `{name}(n)`, the digit sum of abs(n) increased by {k}."),
        _k, lambda p: lambda n: sum(map(int, str(abs(n)))) + p["k"],
        lambda p: f"def {p['name']}(n):\n    return sum(int(d) for d in str(abs(n))) + {p['k']}\n",
        lambda p: f"def {p['name']}(n):\n    return sum(int(d) for d in str(n)) + {p['k']}\n",
        "the minus sign is not a digit: I take abs(n) first",
        lambda rng, p: rng.randint(-99999, 99999)),
    "longest_word": Family(
        "text", ("Write `{name}(text)` that returns the longest word of text (words are separated by spaces); "
                 "if several are equally long, the first of them; '' for a text without words.",
                 "Implement `{name}(text)`: the first of the longest space-separated words of text, or ''.",
                 "I need `{name}(text)` giving the longest word in text, ties going to the earliest, '' if none."),
        lambda rng, pool_of: {}, lambda p: lambda text: max(text.split(), key=len, default=""),
        lambda p: f"def {p['name']}(text):\n    best = ''\n    for w in text.split():\n        if len(w) > len(best):\n"
                  f"            best = w\n    return best\n",
        lambda p: f"def {p['name']}(text):\n    best = ''\n    for w in text.split():\n        if len(w) >= len(best):\n"
                  f"            best = w\n    return best\n",
        "on a tie the first word must win, so only a strictly longer word replaces it",
        lambda rng, p: _text(rng, "abcde", (0, 7))),
    "running_total": Family(
        "xs", ("Write `{name}(xs)` that returns the running totals of xs: item i of the result is "
               "xs[0] + ... + xs[i].",
               "Implement `{name}(xs)`: the cumulative sums of the list xs, one per item.",
               "I need `{name}(xs)` returning prefix sums of xs, each including the current item."),
        lambda rng, pool_of: {}, lambda p: lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))],
        lambda p: f"def {p['name']}(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
                  f"        out.append(total)\n    return out\n",
        lambda p: f"def {p['name']}(xs):\n    out, total = [], 0\n    for x in xs:\n        out.append(total)\n"
                  f"        total += x\n    return out\n",
        "each total must include the current item, so I add before appending",
        lambda rng, p: _ints(rng, -9, 20, (0, 8))),
    "pair_count": Family(
        "xs", ("Write `{name}(xs)` that returns how many pairs of positions i < j have xs[i] + xs[j] == {k}.",
               "Implement `{name}(xs)`: count the index pairs i < j of the list xs whose values add up to {k}.",
               "I need `{name}(xs)` giving the number of pairs (i, j), i < j, with xs[i] + xs[j] equal to {k}."),
        lambda rng, pool_of: {"k": rng.choice([k for k in pool_of("k") if k % 2 == 0] or resample())},
        lambda p: lambda xs: sum(xs[i] + xs[j] == p["k"] for i in range(len(xs)) for j in range(i + 1, len(xs))),
        lambda p: f"def {p['name']}(xs):\n    n = 0\n    for i in range(len(xs)):\n        for j in range(i + 1, len(xs)):\n"
                  f"            n += xs[i] + xs[j] == {p['k']}\n    return n\n",
        lambda p: f"def {p['name']}(xs):\n    n = 0\n    for i in range(len(xs)):\n        for j in range(i, len(xs)):\n"
                  f"            n += xs[i] + xs[j] == {p['k']}\n    return n\n",
        "a position cannot pair with itself: j starts at i + 1",
        lambda rng, p: _ints(rng, 0, p["k"], (0, 9)) + [p["k"] // 2] * rng.randint(0, 2)),
}




def _call_safely(fn: Callable, arg: Any) -> tuple[bool, Any]:
    try:
        return True, fn(arg)
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


def _exec(source: str, name: str) -> Callable:
    """Our own (teacher or bug) source as a function, in this process: only to choose tests."""
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - trusted text written by this module
    return namespace[name]


def _case_text(name: str, arg: Any) -> str:
    return f"{name}({arg!r})"


def _failure(name: str, arg: Any, expected: Any, got: tuple[bool, Any]) -> str:
    ok, value = got
    return (f"{_case_text(name, arg)} returned {value!r}, expected {expected!r}" if ok
            else f"{_case_text(name, arg)} raised {value}")


# ----------------------------------------------------------------------------- environment

class CodeEnv(Environment):
    def __init__(self, name: str, visible: list[dict]):
        self.name, self.visible = name, visible
        self.solution: str | None = None

    @tool
    def show_tests(self) -> str:
        """Show the visible tests of the function to write, one per line."""
        return "\n".join(f"{_case_text(self.name, c['args'][0])} == {c['expected']!r}" for c in self.visible)

    @tool
    def test_solution(self, code: str) -> str:
        """Save `code` as solution.py (replacing the previous one) and run the visible tests on it in a
        sandbox (no network, limited time and memory).

        Args:
            code: The complete Python source of solution.py.
        """
        self.solution = code
        report = run_tests(code, self.name, self.visible)
        if report.error:
            raise ToolError(report.error)
        failed = [(c, r) for c, r in zip(self.visible, report.results) if not r["ok"]]
        if failed:
            lines = [f"{_case_text(self.name, c['args'][0])} " +
                     (f"raised {r['raised']}" if "raised" in r else f"returned {r['got']!r}, expected {c['expected']!r}")
                     for c, r in failed]
            raise ToolError(f"{len(failed)} of {len(self.visible)} tests failed:\n" + "\n".join(lines))
        return f"All {len(self.visible)} tests passed."


# ----------------------------------------------------------------------------- workflow

@dataclass
class Spec:
    family: Family
    params: dict
    visible: list[dict]
    hidden: list[dict]


class CodeWorkflow(Workflow):
    name = "code"
    instructions = """You write small Python functions. Look at the visible tests, then submit the complete
source of solution.py with test_solution; it runs the tests in a sandbox and shows every failure.
Read the failures, fix the code and submit again until all tests pass, then reply with a short
confirmation. Hidden tests with edge cases decide whether the function is right."""

    grammar = Phrasing({r"write": ("create", "code up"), r"implement": ("write", "code up"),
                        r"returns": ("gives back",)},
                       number_slots=("k", "a", "b", "lo", "hi"), protect=("text",))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sandbox = require()  # refuse at once, not at the first tool call, where isolation is missing

    def _build(self, split: str, index: int, seed: int) -> tuple[Task, Spec]:
        rng = random.Random(seed)
        pool_of = functools.partial(pool, split=split, test_share=self.test_share)
        family, spec = draw_family(rng, FAMILIES, lambda f: self._draw(rng, FAMILIES[f], pool_of), seed)
        fam = FAMILIES[family]
        gold = {"kind": "tests", "function": spec.params["name"], "cases": spec.hidden}
        task = self.make_task(rng, split, index, seed, family, fam.templates, spec.params, gold, f"code-{family}")
        return task, spec

    @staticmethod
    def _draw(rng: random.Random, fam: Family, pool_of) -> Spec:
        params = {"name": rng.choice(pool_of("name"))} | fam.params(rng, pool_of)
        ref, bug = fam.ref(params), _exec(fam.bug(params), params["name"])
        seen, cases = set(), []
        for _ in range(300):
            arg = fam.inputs(rng, params)
            if repr(arg) not in seen:
                seen.add(repr(arg))
                cases.append({"args": [arg], "expected": ref(arg)})
            if len(cases) == N_VISIBLE + N_HIDDEN + 6:
                break

        def catches(c: dict) -> bool:
            return _call_safely(bug, c["args"][0]) != (True, c["expected"])
        caught = [c for c in cases if catches(c)]
        if len(caught) < 2:
            raise Resample
        # the visible tests show the bug once; the hidden ones catch it again, with other edge cases
        visible = [c for c in cases if not catches(c)][:N_VISIBLE - 1] + caught[:1]
        rng.shuffle(visible)
        hidden = [c for c in cases if c not in visible][:N_HIDDEN]
        if len(hidden) < N_HIDDEN or not any(map(catches, hidden)):
            raise Resample
        return Spec(fam, params, visible, hidden)

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        return self._build(split, index, seed)[0]

    def make_env(self, task: Task) -> CodeEnv:
        spec = self._build(task.split, task.index, task.seed)[1]
        return CodeEnv(spec.params["name"], spec.visible)

    def teacher(self, task: Task, env: CodeEnv):
        spec = self._build(task.split, task.index, task.seed)[1]
        rng = random.Random(task.seed ^ 0xC0DE)
        name = spec.params["name"]
        yield Call("show_tests", {}, rng.choice(("Let me look at the visible tests first.",
                                                 f"First, the examples {name} must satisfy.")))
        obs = yield Call("test_solution", {"code": spec.family.code(spec.params)},
                         rng.choice(("Writing the function and running the tests.",
                                     f"Here is {name}; let me test it.", "Submitting a first version.")))
        if not obs.ok:
            raise RuntimeError(f"the teacher's solution fails: {obs.text}")
        yield Answer(f"{name} is written and passes the tests.",
                     rng.choice(("All visible tests pass.", "The tests pass.")))

    def mistake(self, task: Task, env: CodeEnv, call: Call, rng: random.Random) -> Mistake | None:
        """The family's typical bug first; the fix quotes the visible case it failed."""
        if call.tool != "test_solution":
            return None
        spec = self._build(task.split, task.index, task.seed)[1]
        name = spec.params["name"]
        bug = _exec(spec.family.bug(spec.params), name)
        for c in spec.visible:
            got = _call_safely(bug, c["args"][0])
            if got != (True, c["expected"]):
                why = f"{_failure(name, c['args'][0], c['expected'], got)}: {spec.family.fix.format(**spec.params)}."
                return Mistake(Call("test_solution", {"code": spec.family.bug(spec.params)}, call.reasoning), why)
        return None

    def lookaround(self, call: Call) -> str | None:
        return "tests" if call.tool == "show_tests" else None

    repairable = True  # a new submission replaces a wrong one

    def state_key(self, env: CodeEnv) -> str:
        return env.solution or ""

    def check(self, task: Task, env: CodeEnv, answer: str) -> Verdict:
        if env.solution is None:
            return Verdict(False, "no solution was submitted")
        report = run_tests(env.solution, task.gold["function"], task.gold["cases"])
        if report.error:
            return Verdict(False, f"hidden tests: {report.error}")
        ok = report.passed == len(task.gold["cases"])
        return Verdict(ok, "" if ok else f"hidden tests: {report.passed} of {len(task.gold['cases'])} passed")


WORKFLOW = CodeWorkflow
