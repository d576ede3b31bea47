"""Run a compiled agent: the interrupt/resume decoder, its tool runtime, and evaluation.

    python infer.py --agent out/sql_tiny --task "How many customers live in Lyon?"   # one episode, streamed
    python infer.py --agent out/sql_tiny --eval --split test --episodes 200          # success rate, latency
    python infer.py --agent out/sql_tiny --eval --mode reprefill                     # the orchestration-loop baseline

An episode in tokens is exactly what data/format.py renders for its transcript. The prompt is
prefilled once into a static KV cache (model/kv_cache.py); the model decodes until <|/call|> or
<|end|>; a call is parsed, checked against the agent's tools and their JSON schemas, executed
with a timeout, and its observation is rendered as <|result|> ... <|/result|> and appended to the
cache in one forward pass at the current offset; decoding resumes. An invalid call becomes an
error observation the model reads, as the faults in its training data did.

--mode selects how context reaches the model, to measure what the design saves:
  incremental  the runtime above (default)
  reprefill    the whole context is re-encoded at every step, as orchestration loops do
  tokenwise    observations are fed one token at a time, as a plain generate() loop would

The compiled agent directory (written by train.py with every checkpoint) holds model.safetensors,
config.json, tokenizer.model (or tokenizer.bpe.json) and agent.json (workflows, tool schemas, token-layout version,
training summary). `--agent` takes that directory or a train.py --out directory (its newest
checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from agentc.data.format import (ANSWER, CALL, CALL_END, END, LAYOUT_VERSION, FormatError, Transcript,
                                parse_model_output, render)
from agentc.data.tokenizer import AGENT_TOKENIZER_FILES, Tokenizer, load_tokenizer
from agentc.model import checkpoint, transformer
from agentc.model.kv_cache import CacheFull, KVCache
from agentc.workflows.base import Observation, Workflow, load_workflow, task_seed

FAILURE_KINDS = ("invalid_format", "unknown_tool", "bad_arguments", "tool_timeout", "step_limit", "token_limit",
                 "wrong_answer")  # token_limit: a turn without a stop token, or the cache full

# ----------------------------------------------------------------------------- the compiled agent


@dataclass
class Agent:
    model: torch.nn.Module
    tok: Tokenizer
    workflow: Workflow
    tools: list[str]           # the allowlist: tool names the agent may call
    meta: dict                 # agent.json
    path: str = ""


def agent_json(data_summary: dict, training: dict) -> dict:
    """What agent.json holds; train.py writes it next to each checkpoint's weights."""
    return {"layout_version": LAYOUT_VERSION, "workflows": data_summary.get("workflows", []),
            "tokenizer": data_summary.get("tokenizer"), "system": data_summary.get("system", "keep"),
            "training": training}


def resolve_agent_dir(path: str) -> str:
    """A checkpoint directory, or a train.py --out directory (then the checkpoint `latest` names)."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    return path


def load_agent(path: str, device="cpu", workflow: str | None = None) -> Agent:
    path = resolve_agent_dir(path)
    for name in ("model.safetensors", "config.json", "agent.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} is not a compiled agent: {name} is missing")
    tok_file = next((os.path.join(path, n) for n in AGENT_TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))), None)
    if tok_file is None:
        raise FileNotFoundError(f"{path} is not a compiled agent: it has no tokenizer ({' or '.join(AGENT_TOKENIZER_FILES)})")
    with open(os.path.join(path, "agent.json")) as f:
        meta = json.load(f)
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(f"{path} was trained on token layout {meta.get('layout_version')}; this runtime "
                         f"speaks {LAYOUT_VERSION}")
    tok = load_tokenizer(tok_file)
    want = (meta.get("tokenizer") or {}).get("fingerprint")
    if want and want != tok.fingerprint:
        raise ValueError(f"{tok_file} is not the tokenizer the agent was trained with")
    flows = meta.get("workflows") or []
    if not flows:
        raise ValueError(f"{path}/agent.json names no workflow")
    pick = next((w for w in flows if w["name"] == workflow), None) if workflow else flows[0]
    if pick is None:
        raise ValueError(f"the agent knows workflows {[w['name'] for w in flows]}, not {workflow!r}")
    model = checkpoint.load(path, device=device).eval()
    tools = [t["function"]["name"] for t in pick["tools"]]
    wf = workflow_of(pick)
    env = wf.make_env(wf.sample_task("test", 0, 0))
    try:
        live = [t.schema() for t in env.tools()]
    finally:
        env.close()
    if json.dumps(live, sort_keys=True) != json.dumps(pick["tools"], sort_keys=True):
        print(f"WARNING: the tools of workflow {pick['name']!r} changed since this agent was trained; it runs "
              "with today's code and schemas", file=sys.stderr)
    return Agent(model, tok, wf, tools, meta, path)


def workflow_of(entry: dict) -> Workflow:
    """The workflow an agent.json / pack summary entry names, built with the same arguments as
    the training data was (its test split depends on them)."""
    return load_workflow(entry.get("module") or entry["name"], **entry.get("kwargs", {}))


# ----------------------------------------------------------------------------- the engine


def cut_tokens(text: str, tok: Tokenizer, budget: int) -> str:
    """An observation cut to at most `budget` tokens, with the same visible marker the training
    data's character cut uses (workflows/base.py cut_observation)."""
    if budget <= 0 or len(tok.encode(text)) <= budget:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix whose tokens, marker included, fit
        mid = (lo + hi + 1) // 2
        cut = text[:mid] + f"\n…[cut: {len(text) - mid} more characters]"
        lo, hi = (mid, hi) if len(tok.encode(cut)) <= budget else (lo, mid - 1)
    return text[:lo] + f"\n…[cut: {len(text) - lo} more characters]"


class Engine:
    """One sequence on a static KV cache: feed() appends injected tokens, decode() samples model
    tokens up to a stop token. `record=True` keeps (position, logits) of every forward chunk."""

    def __init__(self, model, tok: Tokenizer, max_len: int = 4096, mode: str = "incremental",
                 prefill_chunk: int = 1024, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 record: bool = False):
        if mode not in ("incremental", "reprefill", "tokenwise"):
            raise ValueError(f"unknown mode {mode!r}")
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
        self.record = record
        self.logits: list[torch.Tensor] = []
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

    def sample(self, logits: torch.Tensor, opened: int | None = None, temperature: float | None = None) -> int:
        """A token from the next-token logits; `opened`: the <|call|> or <|answer|> this turn has
        opened, if any (it decides which special tokens may come); `temperature` overrides the
        engine's for this token."""
        logits = logits.clone()
        logits[self.banned[opened]] = -math.inf
        temperature = self.temperature if temperature is None else temperature
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        if self.top_p < 1:  # nucleus: the smallest set of tokens whose mass reaches top_p
            p, order = probs.sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def decode(self, logits: torch.Tensor, max_new: int, policy=None, on_token=None,
               temperature: float | None = None) -> list[int]:
        """Sample (or take from `policy(logits)`) up to max_new tokens, stopping after a stop
        token; every token but the last is fed back through the cache."""
        out, opened = [], None
        t0 = time.perf_counter()
        try:
            while len(out) < max_new:
                nxt = policy(logits) if policy else self.sample(logits, opened, temperature)
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

    def mark(self) -> tuple:
        """Where the sequence stands, for rewind(): taken before a turn is decoded."""
        return self.cache.pos, len(self.ids), list(self.pending)

    def rewind(self, mark: tuple) -> None:
        """Forget every token decoded since mark(). Only the cache's offset moves back: the keys
        and values past it are never read again and the next tokens overwrite them."""
        pos, n, pending = mark
        self.cache.pos, self.ids, self.pending, self.full = pos, self.ids[:n], pending, False


# ----------------------------------------------------------------------------- episodes


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
    resampled: int = 0           # turns thrown away first: each repeated a call that had failed
    latency_s: float = 0.0       # ingesting the previous observation + decoding this step
    tool_s: float = 0.0


@dataclass
class EpisodeResult:
    task_id: str
    prompt: str
    success: bool
    failure: str | None          # one of FAILURE_KINDS: the first thing that went wrong
    ended: str                   # answer | step_limit | token_limit | invalid_format
    answer: str | None
    reason: str                  # the checker's verdict, or why the episode stopped
    steps: list[Step]
    messages: list[dict]         # the OpenAI-format transcript (data/format.py renders it back)
    ids: list[int]               # the episode's token stream
    stats: dict
    canonical: bool = True       # render(messages) == ids
    family: str = ""             # the task's question family (workflows draw tasks from families)
    heldout_template: bool = False  # its question was phrased by a template the train split never uses


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


def call_key(out: list[int], tok) -> tuple | None:
    """(tool, arguments) of a turn that is a well-formed call, for comparing calls; else None."""
    try:
        parsed = parse_model_output(out, tok)
    except FormatError:
        return None
    if parsed.call is None:
        return None
    return parsed.call["name"], json.dumps(parsed.call["arguments"], sort_keys=True)


def run_episode(agent: Agent, task, engine: Engine, max_steps: int = 16, max_new_tokens: int = 512,
                observation_tokens: int = 1024, tool_timeout: float = 10.0, policy=None,
                on_event=None, resample_repeats: int = 0, resample_temperature: float = 1.0) -> EpisodeResult:
    """One episode of `task` through the engine, with the workflow's real tools and checker.

    resample_repeats: when a turn repeats, word for word, a call that already returned an error,
    the runtime rewinds the cache to the turn's start and samples the turn again at
    `resample_temperature`, up to this many times (the last try stands, repeat or not). A greedy
    decoder otherwise sends the same failing call until the step limit: its context after the
    error differs by one observation, rarely enough to change its argmax."""
    wf, tok = agent.workflow, agent.tok
    tools = ToolThread(wf, task)
    env = tools.env
    emit = on_event or (lambda *a: None)
    steps: list[Step] = []
    failure, ended, answer, reason, success = None, "step_limit", None, f"no answer within {max_steps} steps", False
    t, messages = Transcript(tok), []
    failed: set[tuple] = set()  # call_key of every call that returned an error
    try:
        # An agent packed with --system drop has its instructions in the weights: no system turn.
        system = None if agent.meta.get("system") == "drop" else tools.run(wf.system_prompt, env)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": task.prompt}]
        t.begin(system)
        t.user(task.prompt)
        t0 = time.perf_counter()
        logits = engine.feed(t.ids, first=True)
        for n in range(max_steps):
            mark, tries = engine.mark(), 0
            out = engine.decode(logits, max_new_tokens, policy, lambda ids: emit("token", ids))
            while policy is None and tries < resample_repeats and call_key(out, tok) in failed:
                engine.rewind(mark)
                tries += 1
                emit("resample", out)
                out = engine.decode(logits, max_new_tokens, None, lambda ids: emit("token", ids),
                                    temperature=resample_temperature)
            t.sampled(out)
            step = Step("invalid", tokens=out, latency_s=time.perf_counter() - t0, resampled=tries)
            steps.append(step)
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
                if kind != "ok":
                    failed.add(call_key(out, tok))
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


def canonical(messages: list[dict], ids: list[int], tok) -> bool:
    """Whether rendering the transcript gives back the episode's exact tokens. Teacher-forced
    episodes always do (tests/test_infer.py); a model may write a call's JSON with other spacing
    or split a word into unusual pieces, which its messages then no longer show."""
    try:
        return render({"messages": messages}, tok).ids.tolist() == list(ids)
    except FormatError:
        return False


# ----------------------------------------------------------------------------- evaluation


def eval_tasks(workflow: Workflow, split: str, n: int, seed: int):
    """n fresh tasks of `split`; seed 1 by default, so none is a task agentc.data.generate (seed 0) made."""
    return [workflow.sample_task(split, i, task_seed(seed, workflow.name, split, i)) for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def evaluate(agent: Agent, episodes: int = 200, split: str = "test", seed: int = 1, mode: str = "incremental",
             max_len: int = 4096, traces: str | None = None, progress: bool = True, temperature: float = 0.0,
             top_p: float = 1.0, workers: int = 1, **episode_kw) -> dict:
    """Run `episodes` fresh tasks; return the summary (and write one trace per episode, in task
    order). workers > 1 runs episodes in that many processes (CPU: torch's threads are shared out
    between them); every episode is the same as with one worker, its seed included."""
    from tqdm import tqdm
    tasks = eval_tasks(agent.workflow, split, episodes, seed)
    engine_kw = dict(max_len=max_len, mode=mode, temperature=temperature, top_p=top_p)
    results = []
    trace_file = open(traces, "w") if traces else None
    bar = tqdm(total=len(tasks), desc=f"eval {split}", unit="ep", disable=not progress)
    pool = None
    try:
        if workers <= 1:
            stream = (_episode(agent, task, i, seed, engine_kw, episode_kw) for i, task in enumerate(tasks))
        else:
            import multiprocessing as mp
            if not agent.path:
                raise ValueError("workers > 1 needs an agent loaded from a directory (each worker loads it)")
            device = str(next(agent.model.parameters()).device)
            threads = max(1, torch.get_num_threads() // workers) if device == "cpu" else 0
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_eval_worker,
                                                initargs=(agent.path, device, agent.workflow.name, threads,
                                                          transformer.ATTENTION))
            jobs = [(task, i, seed, engine_kw, episode_kw) for i, task in enumerate(tasks)]
            stream = pool.imap(_eval_worker_episode, jobs)  # in order, so traces keep task order
        for r in stream:
            results.append(r)
            bar.update()
            if trace_file:
                trace_file.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
                trace_file.flush()
    finally:
        if pool:  # every result is in (or something failed): nothing left to wait for
            pool.terminate()
        bar.close()
        if trace_file:
            trace_file.close()
    summary = summarize(results, mode, split, seed)
    summary["workers"] = max(1, workers)
    return summary


def _episode(agent: Agent, task, i: int, seed: int, engine_kw: dict, episode_kw: dict) -> EpisodeResult:
    engine = Engine(agent.model, agent.tok, seed=seed * 1_000_003 + i, **engine_kw)
    return run_episode(agent, task, engine, **episode_kw)


_WORKER_AGENT: Agent | None = None


def _init_eval_worker(path: str, device: str, workflow: str | None, threads: int, attention: str) -> None:
    global _WORKER_AGENT
    transformer.set_attention(attention, device)  # a spawned process starts from the module default
    if threads:
        torch.set_num_threads(threads)
    _WORKER_AGENT = load_agent(path, device, workflow)


def _eval_worker_episode(job) -> EpisodeResult:
    task, i, seed, engine_kw, episode_kw = job
    return _episode(_WORKER_AGENT, task, i, seed, engine_kw, episode_kw)


def summarize(results: list[EpisodeResult], mode: str, split: str, seed: int) -> dict:
    n = len(results)
    latencies = [s.latency_s for r in results for s in r.steps]
    tot = {k: sum(r.stats[k] for r in results) for k in results[0].stats} if results else {}
    failures = {k: sum(r.failure == k for r in results) for k in FAILURE_KINDS}
    call_errors = {}
    for r in results:
        for s in r.steps:
            if s.observation_kind not in (None, "ok"):
                call_errors[s.observation_kind] = call_errors.get(s.observation_kind, 0) + 1
    return {
        "episodes": n, "split": split, "seed": seed, "mode": mode,
        "success_rate": sum(r.success for r in results) / max(1, n),
        "failures": failures, "errors_in_calls": call_errors,
        "mean_steps": sum(len(r.steps) for r in results) / max(1, n),
        "mean_step_latency_s": sum(latencies) / max(1, len(latencies)),
        "p95_step_latency_s": percentile(latencies, 0.95),
        "prefill_tokens": tot.get("prefill_tokens", 0),
        "prefill_tokens_if_reencoded": tot.get("reencode_tokens", 0),
        "prefill_tokens_saved": tot.get("reencode_tokens", 0) - tot.get("prefill_tokens", 0),
        "decode_tokens": tot.get("decode_tokens", 0),
        "decode_tokens_per_s": tot.get("decode_tokens", 0) / max(1e-9, tot.get("decode_s", 0.0)),
        "mean_tokens_per_episode": sum(len(r.ids) for r in results) / max(1, n),
        "non_canonical_episodes": sum(not r.canonical for r in results),
        "resampled_turns": sum(s.resampled for r in results for s in r.steps),
        # [successes, episodes] per question family, and for questions phrased by a template the
        # train split never saw against the others: where an agent fails, and whether it generalises
        "by_family": {f: [sum(r.success for r in results if r.family == f), sum(r.family == f for r in results)]
                      for f in sorted({r.family for r in results})},
        "by_template": {k: [sum(r.success for r in results if r.heldout_template == held),
                            sum(r.heldout_template == held for r in results)]
                        for k, held in (("seen", False), ("heldout", True))},
    }


def print_summary(s: dict) -> None:
    print(f"\n{s['episodes']} {s['split']} episodes ({s['mode']}): success {100 * s['success_rate']:.1f}%")
    rows = [("failures", ", ".join(f"{k} {v}" for k, v in s["failures"].items())),
            ("errors seen in calls", ", ".join(f"{k} {v}" for k, v in s["errors_in_calls"].items()) or "none"),
            ("mean steps", f"{s['mean_steps']:.2f}"),
            ("latency per step", f"mean {1e3 * s['mean_step_latency_s']:.1f} ms, p95 {1e3 * s['p95_step_latency_s']:.1f} ms"),
            ("prefill tokens", f"{s['prefill_tokens']:,} (re-encoding would run {s['prefill_tokens_if_reencoded']:,}: "
                               f"{s['prefill_tokens_saved']:,} saved)"),
            ("decode", f"{s['decode_tokens']:,} tokens, {s['decode_tokens_per_s']:.0f} tokens/s")]
    if s.get("resampled_turns"):
        rows.append(("resampled turns", f"{s['resampled_turns']} (each repeated a call that had failed)"))
    if s.get("by_template", {}).get("heldout", [0, 0])[1]:
        rows.append(("question templates", ", ".join(f"{k} {a}/{n}" for k, (a, n) in s["by_template"].items())))
    if len(s.get("by_family", {})) > 1:
        rows.append(("by family", ", ".join(f"{f} {a}/{n}" for f, (a, n) in s["by_family"].items())))
    for k, v in rows:
        print(f"  {k:<22} {v}")


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
        elif kind == "resample":  # the turn just shown repeated a failed call: it is sampled again
            print("\n\033[2m[repeats a failed call: sampled again]\033[0m")
            shown[0] = 0
        elif kind == "answer":
            print()
    print(f"\033[1m{prompt}\033[0m")
    return run_episode(agent, task, engine, on_event=on_event, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--agent", required=True, help="compiled agent directory (or a train.py --out directory)")
    ap.add_argument("--workflow", default=None, help="which of the agent's workflows (default: its first); "
                    "with --eval, 'all' evaluates each of them and reports success per workflow")
    ap.add_argument("--task", default=None, help="run one episode with this question, streamed")
    ap.add_argument("--eval", action="store_true", help="evaluate on fresh tasks")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1, help="task seed (agentc.data.generate uses 0: these tasks are new)")
    ap.add_argument("--mode", default="incremental", choices=["incremental", "reprefill", "tokenwise"])
    ap.add_argument("--max-steps", type=int, default=16, help="model turns per episode")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model turn")
    ap.add_argument("--max-len", type=int, default=4096, help="KV cache length: tokens per episode")
    ap.add_argument("--observation-tokens", type=int, default=1024, help="observation budget (cut with a marker)")
    ap.add_argument("--tool-timeout", type=float, default=10.0, help="seconds per tool call")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--resample-repeats", type=int, default=0, help="a turn that repeats a call which returned "
                    "an error is sampled again (cache rewound) up to this many times")
    ap.add_argument("--resample-temperature", type=float, default=1.0, help="temperature of those samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="auto", choices=transformer.BACKENDS,
                    help="attention backend (auto: triton on CUDA, sdpa on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    ap.add_argument("--workers", type=int, default=1, help="episodes run in parallel processes (--eval); on a "
                    "CPU they share the threads, which suits small models whose decoding is Python-bound")
    ap.add_argument("--out", default=None, help="summary JSON (default AGENT/eval_SPLIT_MODE.json)")
    ap.add_argument("--traces", default=None, help="one JSON line per episode (default AGENT/traces_SPLIT_MODE.jsonl)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.eval and args.task is None:
        ap.error("give --task \"...\" for one episode, or --eval")
    if args.workflow == "all" and not args.eval:
        ap.error("--workflow all is for --eval; name one workflow for --task")
    try:
        transformer.set_attention(args.attn, args.device)
        names = [args.workflow]
        if args.workflow == "all":
            names = agent_workflows(args.agent)
        agent = load_agent(args.agent, args.device, names[0])
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: {e}") from None
    if args.resample_repeats > 0 and args.resample_temperature <= 0:
        ap.error("--resample-temperature must be > 0: a greedy retry repeats the same call")
    kw = dict(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
              observation_tokens=args.observation_tokens, tool_timeout=args.tool_timeout,
              resample_repeats=args.resample_repeats, resample_temperature=args.resample_temperature)
    if len(names) > 1:
        return evaluate_each(args, names, kw)
    if args.task is not None:
        engine = Engine(agent.model, agent.tok, args.max_len, args.mode, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
        r = stream_episode(agent, args.task, args.seed, args.split, engine, **kw)
        print(f"\n[{r.ended}; {len(r.steps)} steps; {sum(s.latency_s for s in r.steps):.2f} s in the model]")
        return r
    base = os.path.join(agent.path, f"eval_{args.split}_{args.mode}")
    summary = evaluate(agent, args.episodes, args.split, args.seed, args.mode, args.max_len,
                       traces=args.traces or base.replace("eval_", "traces_") + ".jsonl",
                       temperature=args.temperature, top_p=args.top_p, workers=args.workers, **kw)
    summary.update(agent=agent.path, device=args.device, attention=transformer.attention_backend(args.device),
                   torch=torch.__version__, threads=torch.get_num_threads())
    print_summary(summary)
    out = args.out or base + ".json"
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {out}")
    return summary


def agent_workflows(path: str) -> list[str]:
    with open(os.path.join(resolve_agent_dir(path), "agent.json")) as f:
        return [w["name"] for w in json.load(f).get("workflows") or []] or [None]


def evaluate_each(args, names: list[str], kw: dict) -> dict:
    """--workflow all: every workflow of a mixture agent on its own fresh test tasks, one summary
    and one trace file each, then success per workflow side by side."""
    per = {}
    for name in names:
        agent = load_agent(args.agent, args.device, name)
        base = os.path.join(agent.path, f"eval_{args.split}_{args.mode}_{name}")
        print(f"\n== {name}")
        s = evaluate(agent, args.episodes, args.split, args.seed, args.mode, args.max_len,
                     traces=base.replace("eval_", "traces_") + ".jsonl", temperature=args.temperature,
                     top_p=args.top_p, workers=args.workers, **kw)
        print_summary(s)
        per[name] = s
    rates = {name: s["success_rate"] for name, s in per.items()}
    summary = {"workflows": per, "success_rate_by_workflow": rates,
               "mean_success_rate": sum(rates.values()) / len(rates), "agent": agent.path, "device": args.device,
               "attention": transformer.attention_backend(args.device), "torch": torch.__version__}
    print(f"\n{'workflow':<12} {'success':>8}  episodes")
    for name, s in per.items():
        print(f"{name:<12} {100 * s['success_rate']:>7.1f}%  {s['episodes']}")
    print(f"{'mean':<12} {100 * summary['mean_success_rate']:>7.1f}%")
    out = args.out or os.path.join(agent.path, f"eval_{args.split}_{args.mode}_all.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
