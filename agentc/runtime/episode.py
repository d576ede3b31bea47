"""Episodes: a compiled agent on one task, with the workflow's real tools and checker.

    r = run_episode(agent, task, Engine(model, tok))             # one episode on a one-row engine
    for i, r in run_batch(agent, jobs, Engine(..., rows=16)):     # 16 at a time, continuous batching
        ...

An episode in tokens is exactly what agentc/data/format.py renders for its transcript. The prompt
is prefilled into the row; the model decodes until <|/call|> or <|end|>; a call is parsed, checked
against the agent's tools and their JSON schemas, executed with a timeout, and its observation is
rendered as <|result|> ... <|/result|> and prefilled in one chunk at the row's offset; decoding
resumes. An invalid call becomes an error observation the model reads, as the faults in its
training data did.

The episode's logic is written once, as a generator (`episode`) that yields what it needs: a turn
of the model (`Turn`: feed these tokens, then decode) or work on its tool thread (`Tool`). A driver
answers. run_episode answers at once, one episode at a time. run_batch keeps a row of the engine
for each of up to B episodes: a row whose episode waits for its tool leaves the decode batch while
the others step on, its observation is prefilled when the tool returns, and a finished row takes
the next episode.

An episode ends as an EpisodeResult: its steps, transcript, tokens and the first failure, one of
FAILURE_KINDS. agentc/runtime/evaluate.py runs many and summarizes them.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from agentc.data.format import CALL_END, STOP_TOKENS, FormatError, Transcript, parse_model_output, render
from agentc.model.kv_cache import CacheFull
from agentc.runtime.agent import Agent
from agentc.runtime.engine import Engine
from agentc.workflows.base import Observation


# ----------------------------------------------------------------------------- results

FAILURE_KINDS = ("invalid_format", "unknown_tool", "bad_arguments", "tool_timeout", "step_limit", "token_limit",
                 "wrong_answer", "bad_logits")
# token_limit: a turn without a stop token, or the cache full (the prompt alone, too);
# bad_logits: the model's logits were NaN or +inf, or -inf for every token it may write


@dataclass
class Step:
    kind: str                    # call | answer | invalid
    reasoning: str = ""
    tool: str | None = None
    arguments: dict | None = None
    observation: str | None = None
    observation_kind: str | None = None  # ok | tool_error | bad_arguments | unknown_tool | invalid_format | timeout
    answer: str | None = None
    tokens: list[int] = field(default_factory=list)  # what the model produced in this step
    latency_s: float = 0.0       # ingesting the previous observation + decoding this step
    tool_s: float = 0.0


@dataclass
class EpisodeResult:
    task_id: str
    prompt: str
    success: bool
    failure: str | None          # one of FAILURE_KINDS: the first thing that went wrong
    ended: str                   # answer | step_limit | token_limit | invalid_format | tool_timeout | bad_logits
    answer: str | None
    reason: str                  # the checker's verdict, or why the episode stopped
    steps: list[Step]
    messages: list[dict]         # the OpenAI-format transcript (agentc/data/format.py renders it back)
    ids: list[int]               # the episode's token stream
    stats: dict
    canonical: bool = True       # render(messages) == ids
    family: str = ""             # the task's question family (workflows draw tasks from families)
    heldout: str = "seen"        # "template" / "combination": the question's wording never occurs in training
    repeat: int = 0              # which of an evaluation's `repeats` attempts at this task (pass^k)


def canonical(messages: list[dict], ids: list[int], tok) -> bool:
    """Whether rendering the transcript gives back the episode's exact tokens. Teacher-forced
    episodes always do (tests/test_infer.py); a model may write a call's JSON with other spacing
    or split a word into unusual pieces, which its messages then no longer show."""
    try:
        return render({"messages": messages}, tok).ids.tolist() == list(ids)
    except FormatError:
        return False


def cut_tokens(text: str, tok, budget: int) -> str:
    """An observation cut to at most `budget` tokens, with the same visible marker the training
    data's character cut uses (agentc/workflows/base.py cut_observation)."""
    if budget <= 0 or len(tok.encode(text)) <= budget:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix whose tokens, marker included, fit
        mid = (lo + hi + 1) // 2
        cut = text[:mid] + f"\n…[cut: {len(text) - mid} more characters]"
        lo, hi = (mid, hi) if len(tok.encode(cut)) <= budget else (lo, mid - 1)
    return text[:lo] + f"\n…[cut: {len(text) - lo} more characters]"


# ----------------------------------------------------------------------------- tools


class ToolThread:
    """The episode's environment lives on one daemon thread (SQLite connections, for one, belong
    to the thread that made them): it is built, called, checked and closed there. A call that runs
    past its timeout is interrupted if the environment can (Environment.interrupt) and abandoned
    otherwise; a daemon thread never keeps the process alive."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="agentc-tools").start()
        self.stuck = False

    def _serve(self):
        while True:
            fn, args, box, done = self.jobs.get()
            if fn is None:
                return
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # handed to the caller
                box.append((False, e))
            done.set()

    def submit(self, fn, *args) -> tuple[list, threading.Event]:
        box, done = [], threading.Event()
        self.jobs.put((fn, args, box, done))
        return box, done

    @staticmethod
    def result(box: list):
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def run(self, fn, *args, timeout: float | None = None):
        box, done = self.submit(fn, *args)
        if not done.wait(timeout):
            self.stuck = True
            raise TimeoutError
        return self.result(box)

    def close(self):
        self.jobs.put((None, None, None, None))


# ----------------------------------------------------------------------------- one episode


@dataclass
class Tool:
    """A request: fn(*args) on the episode's tool thread, within `timeout` seconds (None: none);
    the driver sends back its value, or throws its exception or TimeoutError."""
    thread: ToolThread
    fn: Callable
    args: tuple
    timeout: float | None = None


@dataclass
class Turn:
    """A request: feed `ids` into the episode's row (`prefix`: how many of them are the agent's
    fixed prefix, on the first turn), then decode up to max_new tokens; the driver sends back the
    engine's Row (its `out`, `full`, `bad_logits`), or throws CacheFull if the ids do not fit."""
    ids: list[int]
    first: bool
    max_new: int
    prefix: int = 0


def episode(agent: Agent, task, max_steps: int = 16, max_new_tokens: int = 512, observation_tokens: int = 1024,
            tool_timeout: float = 10.0, on_event=None):
    """One episode of `task`, as a generator of Tool and Turn requests that returns its
    EpisodeResult. on_event(kind, payload) sees calls, observations and the answer as they happen."""
    wf, tok = agent.workflow, agent.tok
    emit = on_event or (lambda *a: None)
    stops = {tok.special_ids[s] for s in STOP_TOKENS}
    tools, abandoned = ToolThread(), False
    steps: list[Step] = []
    failure, ended, answer, reason, success = None, "step_limit", None, f"no answer within {max_steps} steps", False
    t, messages, env, row = Transcript(tok), [], None, None
    try:
        env = yield Tool(tools, wf.make_env, (task,))
        # An agent packed with --system drop has its instructions in the weights: no system turn.
        system = None if agent.meta.get("system") == "drop" else (yield Tool(tools, wf.system_prompt, (env,)))
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": task.prompt}]
        t.begin(system)
        prefix = len(t.ids)  # the system turn: the same for every task of the agent
        t.user(task.prompt)
        turn = Turn(list(t.ids), True, max_new_tokens, prefix)
        for n in range(max_steps):
            t0 = time.perf_counter()
            try:
                row = yield turn
            except CacheFull as e:  # the prompt or an observation outgrows the cache
                ended, reason = "token_limit", str(e)
                break
            out = list(row.out)
            t.sampled(out)
            step = Step("invalid", tokens=out, latency_s=time.perf_counter() - t0)
            steps.append(step)
            if row.bad_logits:
                ended, reason = "bad_logits", row.bad_logits
                break
            if not out or out[-1] not in stops:
                ended = "token_limit"  # the turn ran out of tokens or of cache
                reason = "the cache is full" if row.full else f"no stop token within {max_new_tokens} tokens"
                break
            try:
                parsed = parse_model_output(out, tok)
            except FormatError as e:
                if out[-1] != tok.special_ids[CALL_END]:  # a broken answer ends the episode
                    ended, reason, failure = "invalid_format", str(e), failure or "invalid_format"
                    break
                # a broken call: the model reads why, as it did in training. The transcript keeps
                # the raw text (no OpenAI message can hold it); the trace's ids are exact.
                step.observation, step.observation_kind = f"Error: {e}", "invalid_format"
                failure = failure or "invalid_format"
                messages.append({"role": "assistant", "invalid_call": tok.decode(out)})
                messages.append({"role": "tool", "content": None})
            else:
                step.reasoning = parsed.reasoning
                if parsed.answer is not None:
                    step.kind, step.answer, answer = "answer", parsed.answer, parsed.answer
                    msg = {"role": "assistant", "content": parsed.answer}
                    messages.append({"role": "assistant", "reasoning": parsed.reasoning, **msg}
                                    if parsed.reasoning else msg)
                    emit("answer", step)
                    ended = "answer"
                    break
                step.kind, step.tool, step.arguments = "call", parsed.call["name"], parsed.call["arguments"]
                emit("call", step)
                call_id = f"call_{n}"
                msg = {"role": "assistant"}
                if parsed.reasoning:
                    msg["reasoning"] = parsed.reasoning
                messages.append({**msg, "content": None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": step.tool, "arguments": json.dumps(step.arguments, ensure_ascii=False)}}]})
                messages.append({"role": "tool", "tool_call_id": call_id, "name": step.tool, "content": None})
                t1 = time.perf_counter()
                if step.tool not in agent.tools:
                    kind = "unknown_tool"
                    obs = Observation(f"Error: unknown tool '{step.tool}'. Available tools: "
                                      f"{', '.join(agent.tools)}.", kind)
                else:
                    try:
                        obs = yield Tool(tools, env.call, (step.tool, step.arguments), tool_timeout)
                        kind = obs.kind
                    except TimeoutError:
                        env.interrupt()
                        kind, obs = "timeout", Observation(f"Error: {step.tool} did not finish within "
                                                           f"{tool_timeout:g} s", "tool_error")
                step.tool_s = time.perf_counter() - t1
                step.observation, step.observation_kind = obs.text, kind
                if kind in ("unknown_tool", "bad_arguments"):
                    failure = failure or kind
            step.observation = cut_tokens(step.observation, tok, observation_tokens)
            messages[-1]["content"] = step.observation
            emit("observation", step)
            if tools.stuck:  # the environment is in an unknown state: the episode cannot go on
                ended, reason, failure = "tool_timeout", step.observation, failure or "tool_timeout"
                break
            before = len(t.ids)
            t.result(step.observation)
            turn = Turn(t.ids[before:], False, max_new_tokens)
        if ended == "answer":
            verdict = yield Tool(tools, wf.check, (task, env, answer), tool_timeout)
            reason, success = verdict.reason, verdict.ok
            if not success:
                failure = failure or "wrong_answer"
        else:
            failure = failure or ended
    except TimeoutError:
        ended = reason = failure = "tool_timeout"
    except GeneratorExit:  # the driver gave up on the episode: no more requests
        abandoned = True
        raise
    finally:
        if env is not None and not tools.stuck and not abandoned:
            try:
                yield Tool(tools, env.close, ())
            except BaseException:  # a failing close does not change what the episode did
                pass
        tools.close()
    if success:
        failure = None
    return EpisodeResult(task.id, task.prompt, success, failure, ended, answer, reason, steps, messages,
                         list(t.ids), {}, canonical(messages, t.ids, tok), task.family, task.heldout)


# ----------------------------------------------------------------------------- drivers


def run_episode(agent: Agent, task, engine: Engine, max_steps: int = 16, max_new_tokens: int = 512,
                observation_tokens: int = 1024, tool_timeout: float = 10.0, policy=None,
                on_event=None) -> EpisodeResult:
    """One episode of `task` on row 0 of `engine`, answering its requests as they come.
    policy(logits) -> token replaces sampling (tests force a transcript through it); on_event(kind,
    payload) sees tokens, calls, observations and the answer as they happen."""
    emit = on_event or (lambda *a: None)
    gen = episode(agent, task, max_steps, max_new_tokens, observation_tokens, tool_timeout, on_event)
    value, error = None, None
    while True:
        try:
            req = gen.throw(error) if error is not None else gen.send(value)
        except StopIteration as stop:
            result = stop.value
            result.stats = dict(engine.stats)
            return result
        value, error = None, None
        try:
            if isinstance(req, Tool):
                value = req.thread.run(req.fn, *req.args, timeout=req.timeout)
            else:
                logits = engine.feed(req.ids, first=req.first, prefix=req.prefix)
                engine.decode(logits, req.max_new, policy, lambda ids: emit("token", ids))
                value = engine.rows[0]
        except BaseException as e:  # handed to the episode, as a driver of a generator does
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                gen.close()
                raise
            error = e


def make_engine(agent: Agent, rows: int = 1, constrain: bool = False, **engine_kw) -> Engine:
    """An engine of `rows` rows for the agent's model; constrain: tool calls follow the agent's
    tool schemas (agentc/runtime/constrain.py; the grammar is built once per agent)."""
    grammar = None
    if constrain:
        grammar = getattr(agent, "_grammar", None)
        if grammar is None:
            from agentc.runtime.constrain import CallGrammar
            grammar = agent._grammar = CallGrammar(agent.tok, agent.schemas)
    return Engine(agent.model, agent.tok, rows=rows, grammar=grammar, **engine_kw)


def play_episode(agent: Agent, task, i: int, seed: int = 1, engine_kw: dict | None = None,
                 episode_kw: dict | None = None) -> EpisodeResult:
    """Episode i of an evaluation (agentc/runtime/evaluate.py) on a fresh one-row engine whose
    sampling seed depends on the task's index only, so an episode is the same whatever process or
    batch runs it."""
    engine = make_engine(agent, seed=seed * 1_000_003 + i, **(engine_kw or {}))
    return run_episode(agent, task, engine, **(episode_kw or {}))


class _Slot:
    """A row of the batched engine and the episode it runs."""

    def __init__(self, index: int, gen, policy=None):
        self.index, self.gen, self.policy = index, gen, policy
        self.waiting: tuple | None = None  # (box, done, deadline, request) while its tool runs
        self.turn: Turn | None = None      # a turn to prefill and start
        self.fed = 0                       # tokens of the turn's observation prefilled so far


def run_batch(agent: Agent, jobs: Iterable[tuple[Any, int]], engine: Engine, seed: int = 1,
              policies: Callable | None = None, **episode_kw) -> Iterator[tuple[int, EpisodeResult]]:
    """Episodes of `jobs` ((task, index) pairs), one per row of `engine`, as continuous batching:
    yields (index, result) as episodes finish. Episode `index` samples with the seed
    seed * 1_000_003 + index, as play_episode's one-row engine does, so in greedy float32 decoding
    an episode is the same as run alone. policies(index) -> policy(logits) -> token, or None:
    replaces sampling for that episode (tests)."""
    jobs = iter(jobs)
    slots: list[_Slot | None] = [None] * len(engine.rows)
    finished: list[tuple[int, EpisodeResult]] = []

    def advance(row: int, value=None, error=None) -> None:
        """Run the episode of `row` to its next request (or its end)."""
        s = slots[row]
        while True:
            try:
                req = s.gen.throw(error) if error is not None else s.gen.send(value)
            except StopIteration as stop:
                stop.value.stats = dict(engine.rows[row].stats)
                finished.append((s.index, stop.value))
                slots[row] = None
                return
            value, error = None, None
            if isinstance(req, Turn):
                s.turn = req
                return
            box, done = req.thread.submit(req.fn, *req.args)
            if done.is_set():  # answered already (a quick tool): go on without waiting a step
                try:
                    value = ToolThread.result(box)
                except BaseException as e:
                    error = e
                continue
            deadline = None if req.timeout is None else time.perf_counter() + req.timeout
            s.waiting = (box, done, deadline, req)
            return

    def fill() -> None:
        for row, s in enumerate(slots):
            while s is None:  # a free row takes the next episode; one that ends at once frees it again
                job = next(jobs, None)
                if job is None:
                    return
                task, index = job
                engine.start(row, seed * 1_000_003 + index)
                slots[row] = s = _Slot(index, episode(agent, task, **episode_kw), policies and policies(index))
                advance(row)
                s = slots[row]

    try:
        yield from _schedule(engine, slots, fill, advance, finished)
    finally:  # the caller stopped early, or an error: abandon the episodes still running
        for s in slots:
            if s is not None:
                s.gen.close()


def _schedule(engine: Engine, slots: list, fill, advance, finished: list):
    """run_batch's loop: tools that returned, turns to prefill, one batched decode step."""
    fill()
    while any(slots):
        # tools that returned (or ran out of time): their episodes go on
        for row, s in enumerate(slots):
            if s is None or s.waiting is None:
                continue
            box, done, deadline, req = s.waiting
            if done.is_set():
                s.waiting = None
                try:
                    value = ToolThread.result(box)
                except BaseException as e:
                    advance(row, error=e)
                else:
                    advance(row, value)
            elif deadline is not None and time.perf_counter() > deadline:
                s.waiting = None
                req.thread.stuck = True
                advance(row, error=TimeoutError())
        # turns to start: prefill the row (one forward per chunk at its offset). While other rows
        # decode, a long observation goes in engine.interleave tokens per pass, between their steps.
        others = any(r.decoding for r in engine.rows)
        for row, s in enumerate(slots):
            if s is None or s.turn is None:
                continue
            turn, rest = s.turn, s.turn.ids[s.fed:]
            try:
                if others and not turn.first and 0 < engine.interleave < len(rest):
                    if s.fed == 0:
                        engine.check_room(row, len(turn.ids))  # all or nothing, before the first part
                    engine.feed(rest[:engine.interleave], row=row)
                    s.fed += engine.interleave
                    continue
                s.turn, s.fed = None, 0
                logits = engine.feed(rest, first=turn.first, row=row, prefix=turn.prefix)
            except CacheFull as e:
                s.turn, s.fed = None, 0
                advance(row, error=e)
                continue
            engine.begin_turn(row, logits, turn.max_new, s.policy)
        # one token for every row in a turn
        if any(r.decoding for r in engine.rows):
            for row in engine.step():
                advance(row, engine.rows[row])
        elif any(s is not None and s.waiting is not None for s in slots) and not any(
                s is not None and s.turn is not None for s in slots):
            time.sleep(0.0005)  # every episode waits for its tool
        yield from finished
        finished.clear()
        fill()
    yield from finished
