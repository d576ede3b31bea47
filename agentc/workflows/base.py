"""The protocol every workflow follows.

A workflow is five things:

  tools        plain Python methods of an Environment, marked with @tool; their JSON schema
               (OpenAI function-tool format) is derived from type hints and the docstring, and
               arguments are checked against it with a real JSON-Schema validator before a call.
  environment  built per task from the task's seed: fresh state for every episode.
  task sampler `train` and `test` splits disjoint in what matters: entity values, numbers, a
               configurable share of question templates (see split_pool / heldout_templates) and
               of (template, register) combinations; prompts are worded by phrasing.py's grammar.
  teacher      a coroutine: it yields Call / Answer steps and is sent the real Observation of
               each call, so trajectories hold real tool outputs.
  checker      scores the final answer and/or the final environment state.

run_teacher() drives a teacher through an environment and returns the episode as OpenAI chat
messages, the lingua franca of data/: assistant messages carry an optional "reasoning" string and
"tool_calls"; tool results are role "tool" messages; the last assistant message's "content" is
the final answer.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import random
import re
import traceback
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator, Literal, Union

import jsonschema

from agentc.util import dump_json
from agentc.workflows.phrasing import COMBINATION_SHARE, REGISTERS, Phrasing

# Observations longer than this are cut with a visible marker. The runtime calls tools through
# Environment.call too, so training data and deployment see the same policy.
MAX_OBSERVATION_CHARS = 4000


# ----------------------------------------------------------------------------- tools

class ToolError(Exception):
    """Raised by a tool for an error the agent should see and recover from (bad table name...)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable = field(repr=False, compare=False)
    validator: jsonschema.Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        jsonschema.Draft202012Validator.check_schema(self.parameters)
        object.__setattr__(self, "validator", jsonschema.Draft202012Validator(self.parameters))

    def schema(self) -> dict:
        """The OpenAI function-tool entry, as it goes into a trajectory's "tools" list."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": self.parameters}}

    def validate(self, arguments: Any) -> list[str]:
        """Return the schema violations of `arguments` (empty when valid)."""
        errors = sorted(self.validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
        return [(f"{'.'.join(map(str, e.absolute_path))}: " if e.absolute_path else "") + e.message
                for e in errors]


def _json_type(annotation: Any, where: str) -> dict:
    """JSON schema for a Python type hint. Only types a model can write in JSON are allowed."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in simple:
        return {"type": simple[annotation]}
    if origin is Literal:
        return {"enum": list(args)}
    if annotation is list:
        return {"type": "array"}
    if origin is list:
        return {"type": "array", "items": _json_type(args[0], where)}
    if annotation is dict or origin is dict:
        return {"type": "object"}
    if annotation is type(None):
        return {"type": "null"}
    if origin in (Union, types.UnionType):  # Optional[X] is Union[X, None]
        return {"anyOf": [_json_type(a, where) for a in args]}
    raise TypeError(f"{where}: unsupported type hint {annotation!r}; "
                    "use str, int, float, bool, list[...], dict, Literal[...] or Optional[...]")


def _parse_docstring(doc: str, where: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {param: description}).

    The description is everything before "Args:" joined into one paragraph per blank line, plus
    the "Returns:" section, because the model benefits from knowing what a tool gives back;
    "Raises:" and "Examples:" are for Python readers and are left out.
    """
    if not doc or not doc.strip():
        raise ValueError(f"{where}: a tool needs a docstring (it becomes the model-facing description)")
    lines = inspect.cleandoc(doc).splitlines()
    desc_lines, params, current, section = [], {}, None, "desc"
    for line in lines:
        stripped = line.strip()
        header = re.fullmatch(r"(Args|Arguments|Parameters|Returns|Raises|Example|Examples):", stripped)
        if header:
            section = "args" if header.group(1) in ("Args", "Arguments", "Parameters") else header.group(1)
            if section == "Returns":
                desc_lines.append("Returns:")
            current = None
            continue
        if section == "args":
            m = re.match(r"^\s{0,8}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if m and (len(line) - len(line.lstrip())) <= 4:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = (params[current] + " " + stripped).strip()
        elif section in ("desc", "Returns"):
            desc_lines.append(stripped)
    paragraphs = re.split(r"\n\s*\n", "\n".join(desc_lines).strip())
    description = "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return description, params


def tool(fn: Callable) -> Callable:
    """Mark a function or Environment method as a tool; its schema is derived immediately so a
    missing docstring entry or an unsupported type fails at import time, not mid-episode."""
    where = f"tool {fn.__qualname__}"
    description, param_docs = _parse_docstring(fn.__doc__ or "", where)
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for i, (pname, p) in enumerate(inspect.signature(fn).parameters.items()):
        if i == 0 and pname == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{where}: *args / **kwargs cannot be described by a JSON schema")
        if pname not in hints:
            raise TypeError(f"{where}: parameter '{pname}' needs a type hint")
        if pname not in param_docs:
            raise ValueError(f"{where}: parameter '{pname}' is not documented in the docstring's Args section")
        prop = _json_type(hints[pname], f"{where}, parameter '{pname}'")
        if p.default is None and {"type": "null"} not in prop.get("anyOf", []):
            prop = {"anyOf": [prop, {"type": "null"}]}  # `x: int = None` accepts an explicit null
        prop["description"] = param_docs[pname]
        if p.default is inspect.Parameter.empty:
            required.append(pname)
        else:
            prop["default"] = p.default
        properties[pname] = prop
    unknown = set(param_docs) - set(properties)
    if unknown:
        raise ValueError(f"{where}: docstring documents parameters that do not exist: {sorted(unknown)}")
    parameters = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": False}
    fn.__agentc_tool__ = Tool(fn.__name__, description, parameters, fn)
    return fn


def tool_manifest(tools: list[Tool]) -> str:
    """A compact, model-facing list of tools for a system prompt: one line per tool."""
    lines = []
    for t in tools:
        args = []
        for pname, prop in t.parameters["properties"].items():
            typ = prop.get("type") or ("enum" if "enum" in prop else "any")
            opt = "" if pname in t.parameters["required"] else "?"
            args.append(f"{pname}{opt}: {typ}")
        lines.append(f"- {t.name}({', '.join(args)}): {t.description.splitlines()[0]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- environment

@dataclass
class Observation:
    """What a tool call gave back. `text` is what the model sees; `value` is the Python return
    value (for the teacher's convenience; everything it uses must also be in `text`)."""
    text: str
    kind: Literal["ok", "tool_error", "bad_arguments", "unknown_tool", "crash", "transient"] = "ok"
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def cut_observation(text: str, max_chars: int = MAX_OBSERVATION_CHARS) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n…[cut: {len(text) - max_chars} more characters]"


@functools.cache
def _tools_of(cls: type) -> dict[str, Tool]:
    """The @tool methods of an Environment class, in definition order (base classes first). A
    subclass that redefines a tool replaces it; redefining it as a plain method removes it."""
    out: dict[str, Tool] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            t = getattr(attr, "__agentc_tool__", None)
            if t is not None:
                out[name] = t
            elif name in out:
                del out[name]
    return {t.name: t for t in out.values()}


class Environment:
    """Per-episode state plus its tools (methods decorated with @tool)."""

    def tools(self) -> list[Tool]:
        return list(_tools_of(type(self)).values())

    def close(self) -> None:
        """Release what the episode held (connections, temporary files). Called once it is scored."""

    def interrupt(self) -> None:
        """Called from another thread when a tool call runs past the runtime's timeout: stop it if
        you can (the episode ends either way)."""

    def call(self, name: str, arguments: Any) -> Observation:
        """Validate and run one tool call. Never raises: every failure becomes an observation the
        agent can read ("crash" marks a bug in the tool itself, which generation rejects)."""
        tools = _tools_of(type(self))
        if name not in tools:
            return Observation(f"Error: unknown tool '{name}'. Available tools: {', '.join(tools)}.",
                               "unknown_tool")
        errors = tools[name].validate(arguments)
        if errors:
            return Observation(f"Error: invalid arguments for {name}: " + "; ".join(errors), "bad_arguments")
        try:
            value = tools[name].fn(self, **arguments)
            text = cut_observation(value if isinstance(value, str) else dump_json(value))
            text.encode("utf-8")  # half a surrogate pair (an undecodable file name, say) is no text
        except ToolError as e:
            return Observation(cut_observation(f"Error: {e}"), "tool_error")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a bug in the tool (or output JSON or UTF-8 cannot hold), not the agent's fault
            return Observation(cut_observation(f"Error: internal error in {name}: {type(e).__name__}: {e}"), "crash")
        return Observation(text, "ok", value)


# ----------------------------------------------------------------------------- tasks and splits

Split = Literal["train", "test"]
SPLITS = ("train", "test")


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike hash())."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def task_seed(seed: int, workflow: str, split: str, index: int, attempt: int = 0) -> int:
    return stable_hash("task", seed, workflow, split, index, attempt) & 0x7FFF_FFFF_FFFF_FFFF


def split_pool(values: list, split: str, test_share: float, salt: str = "") -> list:
    """The part of `values` that belongs to `split`. The partition is fixed by a stable hash of
    each value, so it never depends on the seed or on the order of the pool, and train and test
    are disjoint by construction. At least one value goes to each side."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if len(set(map(str, values))) != len(values):
        raise ValueError("split_pool needs distinct values")
    if len(values) < 2:
        raise ValueError("split_pool needs at least two values to make two disjoint sides")
    ranked = sorted(values, key=lambda v: stable_hash("split", salt, v))
    n_test = min(len(values) - 1, max(1, round(test_share * len(values))))
    test = set(map(str, ranked[:n_test]))
    return [v for v in values if (str(v) in test) == (split == "test")]


def heldout_templates(templates: list[str], share: float, salt: str = "") -> set[int]:
    """Indices of the templates held out of the train split (share 0 holds none out; any positive
    share holds out at least one and always keeps one for training)."""
    if share <= 0 or len(templates) < 2:
        return set()
    ranked = sorted(range(len(templates)), key=lambda i: stable_hash("template", salt, templates[i]))
    n = min(len(templates) - 1, max(1, round(share * len(templates))))
    return set(ranked[:n])


def heldout_combinations(n_templates: int, held_templates: set[int], share: float,
                         salt: str = "") -> set[tuple[int, str]]:
    """The (template, register) pairs of train templates that the train split never draws: `share`
    of them, chosen by a stable hash, but never every register of one template."""
    pairs = sorted(((t, r) for t in range(n_templates) if t not in held_templates for r in REGISTERS),
                   key=lambda p: stable_hash("combination", salt, *p))
    want, held = round(share * len(pairs)), set()
    left = {t: len(REGISTERS) for t in range(n_templates)}
    for t, r in pairs:
        if len(held) >= want:
            break
        if left[t] > 1:
            held.add((t, r))
            left[t] -= 1
    return held


@dataclass
class Task:
    workflow: str
    split: str
    index: int
    seed: int              # the task's own seed: the environment is built from it
    family: str            # question family
    prompt: str            # the user's message
    gold: dict             # what the checker compares against (JSON-serialisable)
    params: dict = field(default_factory=dict)  # the family's parameters, for traces
    heldout: str = "seen"  # "template" or "combination" when training never words a question so (phrasing.py)
    wording: str = ""      # the prompt's skeleton: its wording with the slots unfilled (phrasing.py)

    @property
    def id(self) -> str:
        return f"{self.workflow}-{self.split}-{self.index:06d}-{self.seed & 0xFFFFFFFF:08x}"

    def to_dict(self) -> dict:
        return asdict(self) | {"id": self.id}


@dataclass
class Verdict:
    ok: bool
    reason: str = ""


def _clean(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").strip().strip("\"'`").strip()


def _number(text: str) -> float | None:
    """The one number in an answer ("42.5", "$1,234.50", "17 customers"); None if none or several."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = re.findall(r"[-+]?\d+(?:\.\d+)?", text)
    return float(found[0]) if len(found) == 1 else None


def check_value(gold: dict, answer: str) -> Verdict:
    """Score a final answer against a value gold, the kinds every workflow shares:
    {"kind": "number", "value", "tol"?}: the answer holds exactly one number, within tol;
    {"kind": "text", "value"}: equal ignoring case, spacing, quotes and a final period;
    {"kind": "list", "value": [...], "ordered"}: the comma-, semicolon- or line-separated items,
    compared like text, in order or as a multiset."""
    if gold["kind"] == "number":
        value = _number(answer)
        if value is None:
            return Verdict(False, f"expected one number, got {answer!r}")
        ok = abs(value - gold["value"]) <= gold.get("tol", 0) + 1e-9
        return Verdict(ok, "" if ok else f"expected {gold['value']}, got {value}")
    if gold["kind"] == "text":
        ok = _clean(answer).casefold() == gold["value"].casefold()
        return Verdict(ok, "" if ok else f"expected {gold['value']!r}, got {answer!r}")
    if gold["kind"] == "list":
        got = [_clean(part).casefold() for part in re.split(r"[,;\n]", answer) if _clean(part)]
        want = [v.casefold() for v in gold["value"]]
        ok = got == want if gold["ordered"] else sorted(got) == sorted(want)
        return Verdict(ok, "" if ok else f"expected {'the ordered list ' if gold['ordered'] else ''}"
                                         f"{gold['value']}, got {answer!r}")
    raise ValueError(f"unknown gold kind {gold.get('kind')!r}")


class Resample(Exception):
    """Raised by a family's sampler when the drawn parameters would make an ambiguous, empty or
    unusable task: draw_family then draws again."""


def resample():
    """raise Resample, usable inside an expression (`choices or resample()`)."""
    raise Resample


def draw_family(rng: random.Random, families: dict, sample: Callable[[str], Any], seed: int) -> tuple[str, Any]:
    """Draw a family name with `rng` and call sample(name), again on Resample (100 tries)."""
    for _ in range(100):
        family = rng.choice(list(families))
        try:
            return family, sample(family)
        except Resample:
            continue
    raise RuntimeError(f"no task could be drawn for seed {seed}")


# ----------------------------------------------------------------------------- teacher steps

@dataclass
class Call:
    tool: str
    args: dict
    reasoning: str = ""


@dataclass
class Answer:
    text: str
    reasoning: str = ""


@dataclass
class Mistake:
    """A deliberate teacher mistake (Workflow.mistake): `call` is sent and its error observed, but
    kept in context with loss weight 0; the corrected call then opens with `recovery` as its
    reasoning, so the policy learns to read an error and fix the call, never to make the mistake."""
    call: Call
    recovery: str


Teacher = Generator[Union[Call, Answer], Observation, None]

# Transient faults (Workflow.fault_rate): what the tool says instead of running, and the reasoning
# of the teacher's retry. A faulted call did nothing, so the retry is the same call.
TRANSIENT_FAULTS = (
    ("Error: the call timed out before the tool answered; nothing was changed.",
     "That call timed out without doing anything; sending it again unchanged."),
    ("Error: rate limit exceeded (too many requests); try again shortly.",
     "Rate limited; retrying the same call."),
    ("Error: the database is locked by another operation; try again.",
     "The database was locked for a moment; retrying the same call."),
)
MAX_CONSECUTIVE_FAULTS = 2  # per call; the teacher retries up to 3 times, so it always gets through


class Workflow:
    """Subclass and fill in the four methods. `test_share` is the share of entity values and
    numbers reserved for the test split; `heldout_template_share` the share of question templates
    per family that only the test split uses."""

    name: str = "base"
    instructions: str = ""  # the system prompt's prose; the tool manifest is appended
    grammar: Phrasing = Phrasing()  # how prompts are worded: the shared synonyms; a workflow adds its own

    def __init__(self, test_share: float = 0.3, heldout_template_share: float = 0.25, mistake_rate: float = 0.0,
                 fault_rate: float = 0.0, phrasing: str = "rich"):
        """mistake_rate: the chance, per teacher call, that a deliberate mistake comes first (if
        the workflow knows one for that call; see `mistake`). fault_rate: the chance, per attempt
        of a call, that the tool fails transiently instead of running (TRANSIENT_FAULTS: a timeout,
        a rate limit, a locked database); the teacher retries the same call, trained, at most
        MAX_CONSECUTIVE_FAULTS times in a row. phrasing: "rich" words train prompts through the
        workflow's paraphrase grammar (`grammar`, phrasing.py), "plain" as the templates are
        written; test prompts are always rich. Every workflow gets these from this class."""
        if not 0 < test_share < 1:
            raise ValueError("test_share must be in (0, 1)")
        if not 0 <= heldout_template_share < 1:
            raise ValueError("heldout_template_share must be in [0, 1)")
        if not 0 <= mistake_rate <= 1:
            raise ValueError("mistake_rate must be in [0, 1]")
        if not 0 <= fault_rate <= 1:
            raise ValueError("fault_rate must be in [0, 1]")
        if phrasing not in ("rich", "plain"):
            raise ValueError(f"phrasing must be 'rich' or 'plain', got {phrasing!r}")
        self.fault_rate = fault_rate
        self.test_share = test_share
        self.heldout_template_share = heldout_template_share
        self.mistake_rate = mistake_rate
        self.phrasing = phrasing

    def make_task(self, rng: random.Random, split: str, index: int, seed: int, family: str,
                  templates: tuple[str, ...] | list[str], params: dict, gold: dict, salt: str) -> Task:
        """A Task asking `family`'s question in one of its templates, drawn with `rng`, worded by the
        workflow's grammar with its own seeded generator. The train split never draws a held-out
        template (heldout_templates with `salt`) nor a held-out (template, register) combination."""
        held = heldout_templates(list(templates), self.heldout_template_share, salt=salt)
        choice = rng.choice([i for i in range(len(templates)) if split == "test" or i not in held])
        combos = heldout_combinations(len(templates), held, COMBINATION_SHARE, salt)
        wrng = random.Random(stable_hash("wording", seed, salt))
        rich = split == "test" or self.phrasing == "rich"
        registers = [r for r in REGISTERS if split == "test" or (choice, r) not in combos] if rich else ["neutral"]
        register = wrng.choice(registers)
        w = self.grammar.word(templates[choice], params, register, wrng, rich=rich)
        heldout = "template" if choice in held else "combination" if (choice, register) in combos else "seen"
        return Task(self.name, split, index, seed, family, w.prompt, gold,
                    params | {"template": choice, "template_text": templates[choice], "register": register},
                    heldout=heldout, wording=w.skeleton)

    def system_prompt(self, env: Environment) -> str:
        return f"{self.instructions.strip()}\n\nTools:\n{tool_manifest(env.tools())}"

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        raise NotImplementedError

    def make_env(self, task: Task) -> Environment:
        raise NotImplementedError

    def teacher(self, task: Task, env: Environment) -> Teacher:
        raise NotImplementedError

    def check(self, task: Task, env: Environment, answer: str) -> Verdict:
        raise NotImplementedError

    # Whether any state of the environment can be put right by later calls (the code workflow: a
    # new submission replaces the last). The teacher's takeover then never gives up on a state.
    repairable: bool = False

    def state_key(self, env: Environment) -> str | None:
        """A fingerprint of what the tools can change in `env` (the database, the files, the
        orders), or None where they change nothing. The teacher's takeover (takeover.py) continues
        from states on the teacher's own path (any state when `repairable`), and reuses what the
        agent's earlier calls returned only while the state is still the one they saw."""
        return None

    def lookaround(self, call: Call) -> str | None:
        """A key for a call that only looks around and decides nothing (listing tables, describing
        one, peeking at a column's values): two calls with the same key tell the agent the same
        thing, however they are written. None for any other call (the default). The teacher's
        takeover (takeover.py) skips a look it has already had in another form, and does not count
        an extra look as leaving its plan."""
        return None

    def mistake(self, task: Task, env: Environment, call: Call, rng: random.Random) -> Mistake | None:
        """A plausible wrong version of the teacher's next `call` whose tool reports an error and
        changes nothing (a misspelt name, a column of another schema), or None. Default: none."""
        return None


def load_workflow(name: str, **kwargs) -> Workflow:
    """`sql` -> workflows/sql.py's WORKFLOW class; a dotted name imports that module instead
    (tests use this for small fake workflows). A module exposes its class as `WORKFLOW`."""
    import importlib
    module_name = name if "." in name else f"agentc.workflows.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(f"no workflow named {name!r} (looked for module {module_name})") from None
    if not hasattr(module, "WORKFLOW"):
        raise ValueError(f"module {module_name} does not define WORKFLOW")
    return module.WORKFLOW(**kwargs)


# ----------------------------------------------------------------------------- rollout

@dataclass
class Episode:
    task: Task
    messages: list[dict]
    tools: list[dict]
    answer: str | None
    verdict: Verdict
    observations: list[Observation]
    error: str | None = None  # the traceback, when the teacher raised

    @property
    def crashed(self) -> bool:
        return any(o.kind == "crash" for o in self.observations)

    @property
    def failure(self) -> str | None:
        """Why the episode failed, or None: tool_crash and teacher_error are bugs in the workflow;
        no_answer is a teacher that stopped or ran out of steps; checker is a rejected answer."""
        if self.crashed:
            return "tool_crash"
        if self.error is not None:
            return "teacher_error"
        if self.answer is None:
            return "no_answer"
        return None if self.verdict.ok else "checker"


def run_teacher(workflow: Workflow, task: Task, max_steps: int = 64) -> Episode:
    """Run the teacher on a fresh environment and score it. Raises nothing for a bad teacher:
    an exception, a step limit or a rejection is reported in the verdict."""
    env = workflow.make_env(task)
    try:
        return _drive(workflow, task, env, max_steps)
    finally:
        env.close()


def _send(messages: list[dict], env: Environment, call: Call, call_id: str, weight: float = 1.0,
          fault: Observation | None = None) -> Observation:
    """Append the assistant message of `call`, run it (or, given a transient `fault`, answer with
    that instead), append its tool message."""
    msg = {"role": "assistant"}
    if call.reasoning:
        msg["reasoning"] = call.reasoning
    msg["content"] = None
    msg["tool_calls"] = [{"id": call_id, "type": "function",
                          "function": {"name": call.tool, "arguments": dump_json(call.args)}}]
    if weight != 1:
        msg["weight"] = weight
    messages.append(msg)
    obs = fault or env.call(call.tool, call.args)
    messages.append({"role": "tool", "tool_call_id": call_id, "name": call.tool, "content": obs.text})
    return obs


def _drive(workflow: Workflow, task: Task, env: Environment, max_steps: int) -> Episode:
    messages = [{"role": "system", "content": workflow.system_prompt(env)},
                {"role": "user", "content": task.prompt}]
    tools = [t.schema() for t in env.tools()]
    observations: list[Observation] = []
    answer = None
    rng = random.Random(stable_hash("mistakes", task.seed))
    fault_rng = random.Random(stable_hash("faults", task.seed))
    gen = workflow.teacher(task, env)
    try:
        step = next(gen)
        for n in range(max_steps):
            if isinstance(step, Answer):
                answer = step.text
                msg = {"role": "assistant", "reasoning": step.reasoning, "content": step.text}
                messages.append(msg if step.reasoning else {"role": "assistant", "content": step.text})
                break
            if not isinstance(step, Call):
                raise TypeError(f"teacher yielded {type(step).__name__}; expected Call or Answer")
            wrong = workflow.mistake(task, env, step, rng) if rng.random() < workflow.mistake_rate else None
            if wrong is not None:
                obs = _send(messages, env, wrong.call, f"call_{n}_mistake", weight=0)
                if obs.ok:
                    raise RuntimeError(f"a deliberate mistake ran without an error: {wrong.call}")
                observations.append(obs)
                step = Call(step.tool, step.args, wrong.recovery)
            for k in range(MAX_CONSECUTIVE_FAULTS):  # transient faults: the same call, retried
                if fault_rng.random() >= workflow.fault_rate:
                    break
                text, retry = TRANSIENT_FAULTS[fault_rng.randrange(len(TRANSIENT_FAULTS))]
                observations.append(_send(messages, env, step, f"call_{n}_fault{k}", fault=Observation(text, "transient")))
                step = Call(step.tool, step.args, retry)
            obs = _send(messages, env, step, f"call_{n}")
            observations.append(obs)
            step = gen.send(obs)
    except StopIteration:
        pass
    except Exception as e:  # the teacher has a bug: report it, do not kill the generator
        return Episode(task, messages, tools, None, Verdict(False, f"teacher_error: {type(e).__name__}: {e}"),
                       observations, traceback.format_exc())
    if answer is None:
        return Episode(task, messages, tools, None, Verdict(False, "no_answer: teacher stopped without an "
                       f"answer or ran past {max_steps} steps"), observations)
    verdict = workflow.check(task, env, answer)
    return Episode(task, messages, tools, answer, verdict, observations)
