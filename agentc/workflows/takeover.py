"""The teacher taking over an episode it did not start: DAgger's expert.

    plan = teacher_plan(workflow, task)                  # the teacher alone, once per task
    t = take_over(workflow, task, calls, plan)           # the agent's calls so far -> the rest
    t.messages, t.answer, t.verdict

The agent's calls are replayed into a fresh environment, so the teacher continues from the real
state the agent left, and the teacher's coroutine is driven on that environment. A call the
teacher makes that the agent already made with the same arguments, and that worked, is not sent
again: the teacher is handed the observation the agent got, and the continuation skips it. So the
teacher re-plans from what is known (a table already described is not described again, an id
already looked up is reused) instead of replaying its script from the top.

State. A workflow whose tools change something names it with `Workflow.state_key(env)`. The
teacher's own run records the key after each of its calls: those are the states on its plan. A
state the agent reached that is on the plan can be continued (a state already at the gold needs
only the answer); any other state is `Unrecoverable("state_off_plan")`: no workflow here can undo
a wrong write (a price raised twice, a row deleted), and the continuation is not tried, except
where the workflow is `repairable` (code: a new submission replaces a wrong one). What the agent's
calls returned is reused only while the state is still the one they left. The
checker has the last word: a continuation it rejects is reported in `verdict`, and the caller
(agentc/runtime/onpolicy.py) counts it and keeps nothing.

A call that only looks around (`Workflow.lookaround`: list the tables, describe one, peek at a
column) counts as the teacher's call with the same key, however it is written, both here and
below.

`first_departure` finds where an agent's episode leaves the teacher's plan: the first call that
failed, that repeats one the agent already made, that left the state off the plan, or that no
call of the teacher's plan matches (same tool and observation, or the same look) and is no mere
look around; or, when every call was on the plan, the answer, if the checker rejected it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from agentc.util import dump_json
from agentc.workflows.base import Answer, Call, Environment, Observation, Task, Verdict, Workflow


class Unrecoverable(Exception):
    """The episode cannot succeed from this state; `reason` says why (a short, countable key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def call_key(tool: str, args) -> str:
    return tool + "\x1f" + json.dumps(args, sort_keys=True, ensure_ascii=False)


@dataclass
class Plan:
    """The teacher's own episode of a task: its calls with their observations and the state after
    each, its answer message."""
    calls: list[tuple[str, dict, str]]          # (tool, args, observation text)
    states: list[str | None]                     # state_key before any call, then after each call
    answer: dict                                 # the final assistant message
    verdict: Verdict

    @property
    def changes_state(self) -> bool:
        return self.states[0] != self.states[-1]


@dataclass
class Continuation:
    messages: list[dict]         # assistant and tool messages, OpenAI format, from the takeover on
    answer: str | None
    verdict: Verdict
    sent: int = 0                # calls the teacher sent
    reused: int = 0              # calls it took from the agent's transcript instead
    observations: list[Observation] = field(default_factory=list)


def _assistant_call(call: Call, call_id: str) -> dict:
    msg = {"role": "assistant"}
    if call.reasoning:
        msg["reasoning"] = call.reasoning
    return msg | {"content": None, "tool_calls": [{"id": call_id, "type": "function",
                                                   "function": {"name": call.tool, "arguments": dump_json(call.args)}}]}


def _answer_message(step: Answer) -> dict:
    return {"role": "assistant", "reasoning": step.reasoning, "content": step.text} if step.reasoning \
        else {"role": "assistant", "content": step.text}


def _drive(workflow: Workflow, task: Task, env: Environment, known: dict[str, Observation], max_steps: int,
           id_prefix: str, states: list | None = None) -> Continuation:
    """Run the teacher on `env`; a call in `known` is answered from it and not sent."""
    messages, observations, sent, reused, answer = [], [], 0, 0, None
    gen = workflow.teacher(task, env)
    step = next(gen)
    try:
        for n in range(max_steps):
            if isinstance(step, Answer):
                messages.append(_answer_message(step))
                answer = step.text
                break
            if not isinstance(step, Call):
                raise TypeError(f"teacher yielded {type(step).__name__}; expected Call or Answer")
            look = workflow.lookaround(step)
            obs = known.get(call_key(step.tool, step.args)) or (known.get("look\x1f" + look) if look else None)
            if obs is not None:
                reused += 1
            else:
                call_id = f"{id_prefix}{n}"
                messages.append(_assistant_call(step, call_id))
                obs = env.call(step.tool, step.args)
                messages.append({"role": "tool", "tool_call_id": call_id, "name": step.tool, "content": obs.text})
                observations.append(obs)
                sent += 1
                if states is not None:
                    states.append(workflow.state_key(env))
            step = gen.send(obs)
    except StopIteration:
        pass
    finally:
        gen.close()
    if answer is None:
        return Continuation(messages, None, Verdict(False, f"no answer within {max_steps} teacher steps"),
                            sent, reused, observations)
    return Continuation(messages, answer, workflow.check(task, env, answer), sent, reused, observations)


def teacher_plan(workflow: Workflow, task: Task, max_steps: int = 64) -> Plan:
    """The teacher's episode of `task` on a fresh environment (no deliberate mistakes, no faults)."""
    env = workflow.make_env(task)
    try:
        states = [workflow.state_key(env)]
        c = _drive(workflow, task, env, {}, max_steps, "call_", states)
    finally:
        env.close()
    calls = [(m["tool_calls"][0]["function"]["name"], json.loads(m["tool_calls"][0]["function"]["arguments"]),
              nxt["content"]) for m, nxt in zip(c.messages, c.messages[1:]) if m.get("tool_calls")]
    return Plan(calls, states, c.messages[-1] if c.answer is not None else {}, c.verdict)


def replay(workflow: Workflow, task: Task, calls: list[tuple[str, dict]]
           ) -> tuple[Environment, list[Observation], list[str | None]]:
    """A fresh environment with `calls` run into it, in order, their observations and the state
    after each; the caller closes the environment."""
    env = workflow.make_env(task)
    try:
        observations, states = [], []
        for tool, args in calls:
            observations.append(env.call(tool, args))
            states.append(workflow.state_key(env))
        return env, observations, states
    except BaseException:
        env.close()
        raise


def take_over(workflow: Workflow, task: Task, calls: list[tuple[str, dict]], plan: Plan,
              max_steps: int = 64) -> Continuation:
    """The teacher's continuation after the agent's `calls`. Raises Unrecoverable when the state
    they leave is off the teacher's plan, or the teacher's plan itself failed."""
    if not plan.verdict.ok:
        raise Unrecoverable("teacher_failed", plan.verdict.reason)
    env, observations, after = replay(workflow, task, calls)
    try:
        state = workflow.state_key(env)
        if state is not None and state not in plan.states and not workflow.repairable:
            raise Unrecoverable("state_off_plan")
        if plan.changes_state and state == plan.states[-1]:  # the writes are done: only the answer is left
            answer = plan.answer.get("content")
            return Continuation([dict(plan.answer)], answer, workflow.check(task, env, answer))
        # what a call returned is known while the state is still the one it left
        known = {}
        for (tool, args), obs, s in zip(calls, observations, after):
            if obs.ok and s == state:
                known[call_key(tool, args)] = obs
                look = workflow.lookaround(Call(tool, args))
                if look:  # the same look in another form (workflow.lookaround) counts as had
                    known.setdefault("look\x1f" + look, obs)
        return _drive(workflow, task, env, known, max_steps, "call_t")
    finally:
        env.close()


# ----------------------------------------------------------------------------- where an agent left the plan

def agent_steps(messages: list[dict]) -> list[dict]:
    """The agent's steps in a runtime transcript (agentc/runtime/episode.py): one entry per
    assistant message, {"message", "result" (its tool message or None), "call" ((tool, args) or
    None), "index" (of the assistant message)}."""
    out = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        result = messages[k + 1] if k + 1 < len(messages) and messages[k + 1].get("role") == "tool" else None
        call = None
        if m.get("tool_calls"):
            f = m["tool_calls"][0]["function"]
            args = f["arguments"]
            call = (f["name"], json.loads(args) if isinstance(args, str) else args)
        out.append({"message": m, "result": result, "call": call, "index": k})
    return out


@dataclass
class Departure:
    step: int            # the index (in agent_steps) of the first step off the plan; len(steps) if none
    why: str             # failed_call | not_in_plan | repeated | state_off_plan | invalid_call | wrong_answer
    #                      | no_answer | "" (none)
    state_ok: bool       # whether the state after that step is still on the plan (a takeover after it can work)


def first_departure(workflow: Workflow, task: Task, steps: list[dict], plan: Plan, success: bool) -> Departure:
    """Where the agent's episode (its agent_steps) first leaves the teacher's plan. Its calls are
    replayed, so observations compare in full (the runtime may have cut them to its token budget)."""
    unmatched, seen = list(plan.calls), set()
    env = workflow.make_env(task)
    try:
        for k, s in enumerate(steps):
            if s["call"] is None:
                if "invalid_call" in s["message"]:
                    return Departure(k, "invalid_call", True)
                return Departure(k, "" if success else "wrong_answer", True)
            tool, args = s["call"]
            obs = env.call(tool, args)
            if plan.states[0] is not None and not workflow.repairable and workflow.state_key(env) not in plan.states:
                return Departure(k, "state_off_plan", False)
            if not obs.ok:
                return Departure(k, "failed_call", True)
            look = workflow.lookaround(Call(tool, args))
            match = next((i for i, (t, a, o) in enumerate(unmatched) if t == tool and
                          (o == obs.text or (look and workflow.lookaround(Call(t, a)) == look))), None)
            repeat = call_key(tool, args) in seen
            seen.add(call_key(tool, args))
            if match is not None and not repeat:
                unmatched.pop(match)
            elif look and not repeat:
                continue  # an extra look around leaves nothing to repair
            else:
                done = repeat or any(t == tool and o == obs.text for t, _, o in plan.calls)
                return Departure(k, "repeated" if done else "not_in_plan", True)
        return Departure(len(steps), "" if success else "no_answer", True)
    finally:
        env.close()
