"""Run a compiled agent: the interrupt/resume engine, its tool runtime, and the command line.

    python infer.py --agent out/sql_mini --task "How many customers live in Lyon?"   # one episode, streamed
    python infer.py --agent out/sql_mini --eval --episodes 200 --workers 2           # success rate, latency
    python infer.py --agent out/mix --eval --workflow all                            # each workflow of a mixture

An episode in tokens is exactly what agentc/data/format.py renders for its transcript. The prompt is
prefilled once into a static KV cache (agentc/model/kv_cache.py); the model decodes until <|/call|>
or <|end|>; a call is parsed, checked against the agent's tools and their JSON schemas, executed
with a timeout, and its observation is rendered as <|result|> ... <|/result|> and appended to the
cache in one forward pass at the current offset; decoding resumes. An invalid call becomes an
error observation the model reads, as the faults in its training data did.
The compiled-agent directory is agentc/runtime/agent.py's; evaluation (fresh tasks, worker
processes, summaries) agentc/runtime/evaluate.py's, which runs each episode through play_episode.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import queue
import sys
import threading
import time

import torch

from agentc.data.format import ANSWER, CALL, CALL_END, END, FormatError, Transcript, parse_model_output
from agentc.data.tokenizer import Tokenizer
from agentc.model.kv_cache import CacheFull, KVCache
from agentc.model.transformer import BACKENDS, resolve_backend
from agentc.runtime import agent as agent_dir
from agentc.runtime.agent import Agent
from agentc.runtime.evaluate import EpisodeResult, Step, canonical, combine, eval_tasks, evaluate, print_summary
from agentc.util import ArgumentParser, run_main, write_json
from agentc.workflows.base import Observation, Workflow
from agentc.workflows import sandbox

# ----------------------------------------------------------------------------- the engine


def cut_tokens(text: str, tok: Tokenizer, budget: int) -> str:
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


MODES = ("incremental", "reprefill", "tokenwise")


class BadLogits(ValueError):
    """Logits no token can be sampled from: NaN, +inf, or -inf for every token the layout allows
    (a numerically broken model; the runtime reports it as a bad_logits failure)."""


class Engine:
    """One sequence on a static KV cache: feed() appends injected tokens, decode() samples model
    tokens up to a stop token. `record=True` keeps (position, logits) of every forward chunk.

    mode: how injected tokens reach the model. "incremental" is the runtime. The other two are
    baselines, kept for experiments/bench_runtime.py and the tests, which measure what the design
    saves: "reprefill" re-encodes the whole context at every step (an orchestration loop),
    "tokenwise" feeds an observation one token at a time (a plain generate() loop)."""

    def __init__(self, model, tok: Tokenizer, max_len: int = 4096, mode: str = "incremental",
                 prefill_chunk: int = 1024, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 record: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.model, self.tok, self.mode = model, tok, mode
        self.max_len, self.prefill_chunk = max_len, max(1, prefill_chunk)
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator().manual_seed(seed)
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(model.cfg, max_len, 1, p.device, p.dtype)
        # The runtime's own tokens are never sampled, and the model's follow the layout's grammar:
        # reasoning, then <|call|> JSON <|/call|> or <|answer|> text <|end|>. Training data always
        # does, so the constraint removes no mass a well-trained model would give a valid token.
        sid = tok.special_ids
        own = {sid[t] for t in (CALL, CALL_END, ANSWER, END)}
        never = [i for i in tok.unsampled_ids() if i not in own]  # other specials, <unk>, PRESPLIT
        never += list(range(tok.vocab_size, model.cfg.vocab_size))  # embedding rows with no piece
        ban = lambda *names: torch.tensor(never + [sid[t] for t in names], device=p.device)  # noqa: E731
        self.banned = {None: ban(CALL_END, END), sid[CALL]: ban(CALL, ANSWER, END),
                       sid[ANSWER]: ban(CALL, ANSWER, CALL_END)}
        self.openers = {sid[CALL], sid[ANSWER]}
        self.stop = {sid[CALL_END], sid[END]}
        self.ids: list[int] = []    # the sequence the cache holds
        self.pending: list[int] = []  # a sampled stop token, fed with whatever follows it
        self.full = False           # decode() stopped because the cache is full
        self.bad_logits: str | None = None  # why decode() stopped on logits it cannot sample from
        self.record, self.logits = record, []
        # prefill: injected tokens run in chunks (a sampled stop token rides with the next chunk);
        # reencode: what an orchestration loop would prefill; forward: every token through the model
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0,
                      "reencode_tokens": 0, "forward_tokens": 0}

    @torch.no_grad()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Run ids through the model at the cache's offset, in chunks of prefill_chunk; the
        logits (vocab,) of the last one."""
        last = None
        self.stats["forward_tokens"] += len(ids)
        for s in range(0, len(ids), self.prefill_chunk):
            x = torch.tensor([ids[s:s + self.prefill_chunk]], device=self.device)
            start = self.cache.pos
            h = self.model.hidden(x, cache=self.cache)
            if self.record:
                self.logits.append((start, self.model.head(h[0]).float()))
            last = h[0, -1]
        return self.model.head(last).float()

    def feed(self, ids: list[int], first: bool = False) -> torch.Tensor:
        """Append injected tokens (the prompt, an observation); returns the next-token logits."""
        t0 = time.perf_counter()
        ids, self.pending = self.pending + list(ids), []
        if len(self.ids) + len(ids) > self.max_len:  # before any chunk runs: all or nothing
            raise CacheFull(f"{len(self.ids)} tokens + {len(ids)} new exceed the cache of {self.max_len}")
        self.stats["reencode_tokens"] += len(self.ids) + len(ids)  # what re-encoding would have run
        if self.mode == "reprefill" and not first:
            self.cache.reset()
            self.ids = self.ids + list(ids)
            n, logits = len(self.ids), self._forward(self.ids)
        elif self.mode == "tokenwise" and not first:
            self.ids.extend(ids)
            n = len(ids)
            for i in ids:
                logits = self._forward([i])
        else:
            self.ids.extend(ids)
            n, logits = len(ids), self._forward(list(ids))
        self.stats["prefill_tokens"] += n
        self.stats["prefill_s"] += time.perf_counter() - t0
        return logits

    def sample(self, logits: torch.Tensor, opened: int | None = None) -> int:
        """A token from the next-token logits; `opened`: the <|call|> or <|answer|> this turn has
        opened, if any (it decides which special tokens may come). Raises BadLogits."""
        logits = logits.clone()
        logits[self.banned[opened]] = -math.inf
        top = logits.max()  # NaN if any allowed logit is NaN
        if not torch.isfinite(top):
            raise BadLogits(f"the model's logits are not finite numbers (the largest allowed is {top.item()})")
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax((logits - top) / self.temperature, dim=-1).cpu()  # largest 0: nothing overflows
        if self.top_p < 1:  # nucleus: the smallest set of tokens whose mass reaches top_p
            p, order = probs.sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def decode(self, logits: torch.Tensor, max_new: int, policy=None, on_token=None) -> list[int]:
        """Sample (or take from `policy(logits)`) up to max_new tokens, stopping after a stop
        token; every token but the last is fed back through the cache."""
        out, opened = [], None
        t0 = time.perf_counter()
        try:
            while len(out) < max_new:
                try:
                    nxt = policy(logits) if policy else self.sample(logits, opened)
                except BadLogits as e:
                    self.bad_logits = str(e)
                    break
                out.append(nxt)
                if nxt in self.openers:
                    opened = nxt
                if on_token:
                    on_token(out)
                if nxt in self.stop:
                    break
                try:
                    logits = self._forward([nxt])
                except CacheFull:
                    self.full = True
                    break
                self.ids.append(nxt)
        finally:
            self.stats["decode_tokens"] += len(out)
            self.stats["decode_s"] += time.perf_counter() - t0
        if out and out[-1] in self.stop:
            self.pending = [out[-1]]
        return out


# ----------------------------------------------------------------------------- episodes


class ToolThread:
    """The episode's environment lives on one daemon thread (SQLite connections, for one, belong
    to the thread that made them): it is built, called, checked and closed there. A call that runs
    past its timeout is interrupted if the environment can (Environment.interrupt) and abandoned
    otherwise; a daemon thread never keeps the process alive."""

    def __init__(self, workflow: Workflow, task):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="agentc-tools").start()
        self.stuck = False
        self.env = self.run(workflow.make_env, task)

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

    def run(self, fn, *args, timeout: float | None = None):
        box, done = [], threading.Event()
        self.jobs.put((fn, args, box, done))
        if not done.wait(timeout):
            self.stuck = True
            raise TimeoutError
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def call(self, name: str, arguments: dict, allowed: list[str], timeout: float) -> tuple[Observation, str]:
        if name not in allowed:
            return Observation(f"Error: unknown tool '{name}'. Available tools: {', '.join(allowed)}.",
                               "unknown_tool"), "unknown_tool"
        try:
            obs = self.run(self.env.call, name, arguments, timeout=timeout)
        except TimeoutError:
            self.env.interrupt()
            return Observation(f"Error: {name} did not finish within {timeout:g} s", "tool_error"), "timeout"
        return obs, obs.kind

    def close(self):
        if not self.stuck:
            self.run(self.env.close)
        self.jobs.put((None, None, None, None))


def run_episode(agent: Agent, task, engine: Engine, max_steps: int = 16, max_new_tokens: int = 512,
                observation_tokens: int = 1024, tool_timeout: float = 10.0, policy=None,
                on_event=None) -> EpisodeResult:
    """One episode of `task` through the engine, with the workflow's real tools and checker.
    policy(logits) -> token replaces sampling (tests force a transcript through it); on_event(kind,
    payload) sees tokens, calls, observations and the answer as they happen."""
    wf, tok = agent.workflow, agent.tok
    tools = ToolThread(wf, task)
    env = tools.env
    emit = on_event or (lambda *a: None)
    steps: list[Step] = []
    failure, ended, answer, reason, success = None, "step_limit", None, f"no answer within {max_steps} steps", False
    t, messages = Transcript(tok), []
    try:
        # An agent packed with --system drop has its instructions in the weights: no system turn.
        system = None if agent.meta.get("system") == "drop" else tools.run(wf.system_prompt, env)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": task.prompt}]
        t.begin(system)
        t.user(task.prompt)
        t0 = time.perf_counter()
        try:
            logits = engine.feed(t.ids, first=True)
        except CacheFull as e:  # the prompt alone outgrows the cache: no turn can start
            logits, ended, reason = None, "token_limit", str(e)
        for n in range(max_steps if logits is not None else 0):
            out = engine.decode(logits, max_new_tokens, policy, lambda ids: emit("token", ids))
            t.sampled(out)
            step = Step("invalid", tokens=out, latency_s=time.perf_counter() - t0)
            steps.append(step)
            if engine.bad_logits:
                ended, reason = "bad_logits", engine.bad_logits
                break
            if not out or out[-1] not in engine.stop:  # the turn ran out of tokens or of cache
                ended = "token_limit"
                reason = "the cache is full" if engine.full else f"no stop token within {max_new_tokens} tokens"
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
                obs, kind = tools.call(step.tool, step.arguments, agent.tools, tool_timeout)
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
            t0 = time.perf_counter()
            before = len(t.ids)
            t.result(step.observation)
            try:
                logits = engine.feed(t.ids[before:])
            except CacheFull as e:
                ended, reason = "token_limit", str(e)
                break
        if ended == "answer":
            verdict = tools.run(wf.check, task, env, answer, timeout=tool_timeout)
            reason, success = verdict.reason, verdict.ok
            if not success:
                failure = failure or "wrong_answer"
        else:
            failure = failure or ended
    except TimeoutError:
        ended = reason = failure = "tool_timeout"
    finally:
        tools.close()
    if success:
        failure = None
    return EpisodeResult(task.id, task.prompt, success, failure, ended, answer, reason, steps, messages,
                         list(t.ids), dict(engine.stats), canonical(messages, t.ids, tok), task.family,
                         task.heldout_template)


def play_episode(agent: Agent, task, i: int, seed: int = 1, engine_kw: dict | None = None,
                 episode_kw: dict | None = None) -> EpisodeResult:
    """Episode i of an evaluation (agentc/runtime/evaluate.py): a fresh engine whose sampling seed
    depends on the task's index only, so an episode is the same whatever process runs it."""
    engine = Engine(agent.model, agent.tok, seed=seed * 1_000_003 + i, **(engine_kw or {}))
    return run_episode(agent, task, engine, **(episode_kw or {}))


# ----------------------------------------------------------------------------- interactive


def stream_episode(agent: Agent, prompt: str, seed: int, split: str, engine: Engine, **kw) -> EpisodeResult:
    """One episode whose question is `prompt`, in the world of a fresh task (for SQL: its
    database), printed as it happens."""
    task = eval_tasks(agent.workflow, split, 1, seed)[0]
    task.prompt = prompt
    shown = [0]

    def on_event(kind, payload):
        if kind == "token":  # print the text as it grows
            text = agent.tok.decode(payload)
            sys.stdout.write(text[shown[0]:])
            sys.stdout.flush()
            shown[0] = len(text)
        elif kind == "observation":
            print(f"\n\033[2m<|result|> {payload.observation} <|/result|>\033[0m")
            shown[0] = 0
        elif kind == "answer":
            print()
    print(f"\033[1m{prompt}\033[0m")
    return run_episode(agent, task, engine, on_event=on_event, **kw)


def main(argv=None):
    ap = ArgumentParser(prog="infer.py", description=__doc__.split("\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--agent", required=True, help="compiled agent directory (or a train.py --out directory)")
    ap.add_argument("--workflow", default=None, help="which of the agent's workflows (default: its first); "
                    "with --eval, 'all' evaluates each of them and reports success per workflow")
    ap.add_argument("--task", default=None, help="run one episode with this question, streamed")
    ap.add_argument("--eval", action="store_true", help="evaluate on fresh tasks")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1, help="task seed (agentc.data.generate uses 0: these tasks are new)")
    ap.add_argument("--mode", default="incremental", choices=MODES,
                    help="incremental is the runtime; the others are baselines (see Engine)")
    ap.add_argument("--max-steps", type=int, default=16, help="model turns per episode")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model turn")
    ap.add_argument("--max-len", type=int, default=4096, help="KV cache length: tokens per episode")
    ap.add_argument("--observation-tokens", type=int, default=1024, help="observation budget (cut with a marker)")
    ap.add_argument("--tool-timeout", type=float, default=10.0, help="seconds per tool call")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="auto", choices=BACKENDS, help="attention backend (auto: triton on CUDA, sdpa on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    ap.add_argument("--workers", type=int, default=1, help="episodes run in parallel processes (--eval); on a "
                    "CPU they share the threads, which suits small models whose decoding is Python-bound")
    ap.add_argument("--out", default=None, help="summary JSON (default AGENT/eval_SPLIT_MODE.json)")
    ap.add_argument("--traces", default=None, help="one JSON line per episode (default AGENT/traces_SPLIT_MODE.jsonl)")
    ap.add_argument("--unsafe-sandbox", action="store_true",
                    help="run model-written code (the code workflow) even where no OS isolation works")
    args = ap.parse_args(argv)
    if args.unsafe_sandbox:
        sandbox.allow_unsafe()
    for name, low in (("episodes", 1), ("max_steps", 1), ("max_new_tokens", 1), ("max_len", 2),
                      ("observation_tokens", 1), ("threads", 0), ("workers", 1), ("temperature", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not args.tool_timeout > 0:
        ap.error(f"--tool-timeout must be positive, got {args.tool_timeout}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    for name in ("out", "traces"):
        if getattr(args, name) and os.path.isdir(getattr(args, name)):
            ap.error(f"--{name} {getattr(args, name)} is a directory; give a file to write")
    kind = args.device.split(":")[0]
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device {args.device}: " + ("no CUDA GPU is available here" if kind == "cuda"
                                                else "expected cpu or cuda"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.eval and args.task is None:
        ap.error("give --task \"...\" for one episode, or --eval")
    if args.workflow == "all" and not args.eval:
        ap.error("--workflow all is for --eval; name one workflow for --task")
    try:
        names = agent_dir.workflow_names(args.agent) if args.workflow == "all" else [args.workflow]
        agents = [agent_dir.load(args.agent, args.device, name, args.attn) for name in names]
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: {e}") from None
    episode_kw = dict(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                      observation_tokens=args.observation_tokens, tool_timeout=args.tool_timeout)
    engine_kw = dict(max_len=args.max_len, mode=args.mode, temperature=args.temperature, top_p=args.top_p)
    if args.task is not None:
        agent = agents[0]
        engine = Engine(agent.model, agent.tok, seed=args.seed, **engine_kw)
        r = stream_episode(agent, args.task, args.seed, args.split, engine, **episode_kw)
        print(f"\n[{r.ended}; {len(r.steps)} steps; {sum(s.latency_s for s in r.steps):.2f} s in the model]")
        return r
    play = functools.partial(play_episode, seed=args.seed, engine_kw=engine_kw, episode_kw=episode_kw)
    per = {}
    for agent in agents:
        name = "" if len(agents) == 1 else f"_{agent.workflow.name}"
        base = os.path.join(agent.path, f"eval_{args.split}_{args.mode}{name}")
        if len(agents) > 1:
            print(f"\n== {agent.workflow.name}")
        per[agent.workflow.name] = s = evaluate(agent, play, args.episodes, args.split, args.seed,
                                                traces=(len(agents) == 1 and args.traces) or
                                                base.replace("eval_", "traces_") + ".jsonl", workers=args.workers)
        s["mode"] = args.mode
        print_summary(s)
    summary = per[agents[0].workflow.name] if len(agents) == 1 else combine(per)
    summary.update(agent=agents[0].path, mode=args.mode, device=args.device, torch=torch.__version__,
                   attention=resolve_backend(args.attn, args.device), threads=torch.get_num_threads())
    if len(agents) > 1:
        print_summary(summary)
    out = args.out or os.path.join(agents[0].path, f"eval_{args.split}_{args.mode}{'_all' * (len(agents) > 1)}.json")
    write_json(out, summary)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    run_main(main, "infer.py")
