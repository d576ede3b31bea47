"""Fuzzing the runtime: whatever the model writes and whatever its tools do, an episode ends with a
success or a failure kind of FAILURE_KINDS, and no exception escapes play_episode / run_episode.

The model (FuzzModel) has the interface the Engine drives (cfg, parameters, hidden, head) and keeps
the KV cache's books as the Transformer does; its logits steer toward an adversarial plan of turns:
special tokens in odd places, deep or enormous JSON, invalid UTF-8 byte pieces, huge numbers,
unknown tools, wrong argument types, turns that never stop. Now and then the logits are NaN,
infinite or huge, or bait the tokens the sampler must never pick. A share of the episodes bypasses
sampling with a policy, so tokens the sampler refuses (<|begin|>, <|result|>) reach the parser
too. The tools (FuzzEnv) hang past the timeout, raise anything, return megabytes or output no JSON
or tokenizer can hold. Every episode is drawn from its own seed: a failure names its seeds, and
fuzz_episode(tok, seed) replays one.
"""
import json
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict

import pytest
import torch

import infer
from agentc.data.format import ANSWER, BEGIN, CALL, CALL_END, END, RESULT, SPECIAL_TOKENS
from agentc.model.transformer import ModelConfig, Transformer
from agentc.runtime import evaluate as ev
from agentc.runtime.episode import FAILURE_KINDS
from agentc.runtime.agent import Agent
from agentc.util import dump_json
from agentc.workflows.base import Environment, Task, ToolError, Verdict, Workflow, tool

ENDINGS = ("answer", "step_limit", "token_limit", "invalid_format", "tool_timeout", "bad_logits")
TIMEOUT = 0.05  # seconds per tool call in the fuzz: hangs cost little


class Abort(BaseException):
    """Neither an Exception nor an interrupt: what a careless tool might still raise."""


def nested(depth: int) -> list:
    x = []
    for _ in range(depth):
        x = [x]
    return x


RAISES = {"tool": ToolError, "value": ValueError, "recursion": RecursionError, "memory": MemoryError,
          "timeout": TimeoutError, "generator_exit": GeneratorExit, "abort": Abort}
ODD = {"surrogate": lambda: "half a pair: \ud800", "nan": lambda: {"x": float("nan")}, "bytes": lambda: b"\xff",
       "set": lambda: {1, 2}, "deep": lambda: nested(5000), "bigint": lambda: 10 ** 5000, "object": object}


class FuzzEnv(Environment):
    def __init__(self):
        self.stop = threading.Event()

    def interrupt(self):
        self.stop.set()

    @tool
    def echo(self, text: str) -> str:
        """Say the text back.

        Args:
            text: What to say.
        """
        return text

    @tool
    def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return str(a + b)

    @tool
    def hang(self, seconds: float) -> str:
        """Wait until interrupted (at most a second).

        Args:
            seconds: How long to wait.
        """
        self.stop.wait(min(seconds, 1.0))
        return "woke up"

    @tool
    def sleep(self, seconds: float) -> str:
        """Sleep, deaf to interrupts (at most a second).

        Args:
            seconds: How long to sleep.
        """
        time.sleep(min(max(seconds, 0.0), 1.0))
        return "slept"

    @tool
    def flood(self, megabytes: float) -> str:
        """Return megabytes of text.

        Args:
            megabytes: How many.
        """
        return "all work and no play " * int(min(megabytes, 8.0) * 50_000)

    @tool
    def fail(self, kind: str) -> str:
        """Raise an exception.

        Args:
            kind: Which one.
        """
        raise RAISES.get(kind, ToolError)(f"fuzz: {kind}")

    @tool
    def odd(self, kind: str) -> str:
        """Return what JSON or a tokenizer cannot hold.

        Args:
            kind: Which.
        """
        return ODD.get(kind, lambda: None)()


TOOLS = ["echo", "add", "hang", "sleep", "flood", "fail", "odd"]


class FuzzWorkflow(Workflow):
    name, instructions = "fuzz", "Answer 42, whatever is asked. The tools misbehave."

    def sample_task(self, split, index, seed):
        return Task("fuzz", split, index, seed, "fuzz", "What is six times seven? 🙂", {"value": "42"})

    def make_env(self, task):
        return FuzzEnv()

    def check(self, task, env, answer):
        return Verdict(answer.strip() == "42", "expected 42")


# ----------------------------------------------------------------------------- what the model writes

NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-0", "1.5", "9" * 40, "-" + "9" * 4400, "1e-400", "0x10", "true"]
MALFORMED = ["", "{", "}", "not json", "[]", "null", '"echo"', "42", '{"name": "echo"}', '{"arguments": {}}',
             '{"name": "echo", "arguments": {}, "extra": 1}', '{"name": 7, "arguments": {}}',
             '{"name": "echo", "arguments": []}', '{"name": "echo", "arguments": {"text": "a",}}',
             '{"name": "echo", "arguments": {"text": "unterminated}}', '{"name": "echo" "arguments": {}}',
             '{"name": "echo", "arguments": {"text": "\\x"}}', '{"name": "\\ud800", "arguments": {}}']


def junk(rng: random.Random, depth: int = 0):
    """A JSON value of any type."""
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.3:
        return {rng.choice(["text", "a", "x", ""]): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([None, True, 0, -1, 2 ** 70, 1e308, float("nan"), float("inf"), "", "x" * 3000,
                       "<|end|><|call|>", "ünïcödé 🙂", "\x00\x1b[2J", "9" * 4000])


def well_typed(rng: random.Random, name: str) -> dict:
    """Arguments that pass tool `name`'s schema, and make it misbehave."""
    return {"echo": lambda: {"text": rng.choice(["hi", "é" * 2000, "<|end|>", "\u2581 space mark", ""])},
            "add": lambda: {"a": rng.choice([1, -5, 10 ** 4000]), "b": rng.choice([2, 10 ** 4000])},
            "hang": lambda: {"seconds": rng.choice([0.0, 5.0, -1.0])},
            "sleep": lambda: {"seconds": rng.choice([0.0, 0.3])},
            "flood": lambda: {"megabytes": rng.choice([0.01, 1.0, 5.0, -1.0])},
            "fail": lambda: {"kind": rng.choice([*RAISES, "unheard of"])},
            "odd": lambda: {"kind": rng.choice(list(ODD))}}[name]()


def call_text(rng: random.Random) -> str:
    """The JSON of one adversarial tool call, or text that is almost one."""
    name = rng.choice([*TOOLS, "drop_database", "", "échø" * 40, "__init__", "call", "Echo"])
    depth = rng.choice([3, 32, 33, 200, 900, 990, 1100, 5000])
    r = rng.random()
    if r < 0.35:  # a call the tools accept, and then misbehave on
        name = rng.choice(TOOLS)
        return json.dumps({"name": name, "arguments": well_typed(rng, name)}, ensure_ascii=rng.random() < 0.5)
    if r < 0.55:  # any name, arguments of any type
        keys = ["text", "a", "b", "seconds", "kind", "self", "x"]
        args = {rng.choice(keys): junk(rng) for _ in range(rng.randint(0, 3))}
        return json.dumps({"name": name, "arguments": args})
    if r < 0.65:  # nesting deeper than Python's recursion limit, or just under it
        return '{"name": "echo", "arguments": {"text": ' + "[" * depth + "]" * depth + "}}"
    if r < 0.75:
        return f'{{"name": "add", "arguments": {{"a": {rng.choice(NUMBERS)}, "b": {rng.choice(NUMBERS)}}}}}'
    if r < 0.8:  # escapes of half a surrogate pair: valid JSON, but no text
        half = rng.choice(["\\ud800", "x\\udfff", "\\ud83d\\ude00"])  # the last is a whole pair: 😀
        return '{"name": "echo", "arguments": {"text": "%s"}}' % half
    return rng.choice(MALFORMED)


class Plan:
    """An endless stream of adversarial model turns, as token ids."""

    def __init__(self, rng: random.Random, tok):
        self.rng, self.tok, self.queue = rng, tok, deque()
        self.sid = tok.special_ids
        self.bytes = [i for i in range(tok.vocab_size) if tok.piece(i).startswith("<0x")]

    def __next__(self) -> int:
        while not self.queue:
            self.queue.extend(self.turn())
        return self.queue.popleft()

    def turn(self) -> list[int]:
        rng, sid, enc = self.rng, self.sid, self.tok.encode
        reasoning = enc(rng.choice(["", "Let me think. ", "ééé 🙂 ", "<|end|> is only text. ", "\n\n\t"]))
        r = rng.random()
        if r < 0.6:
            ids = reasoning + [sid[CALL]] + enc(call_text(rng)) + [sid[CALL_END]]
        elif r < 0.7:
            text = rng.choice(["42", " 42.", "forty-two", "9" * 5000, "", "<|end|>", "ünïcödé"])
            ids = reasoning + [sid[ANSWER]] + enc(text) + [sid[END]]
        elif r < 0.78:  # byte pieces that are no UTF-8, inside a call or an answer
            opener, stop = rng.choice([(CALL, CALL_END), (ANSWER, END)])
            ids = [sid[opener]] + rng.choices(self.bytes, k=rng.randint(1, 40)) + [sid[stop]]
        elif r < 0.85:  # any ids at all, special tokens included
            ids = [rng.randrange(self.tok.vocab_size) for _ in range(rng.randint(1, 60))]
        elif r < 0.9:  # a turn that never stops
            ids = enc("all work and no play ") * rng.choice([10, 100, 1000])
        else:  # a well-formed call with a special token somewhere inside it
            ids = [sid[CALL]] + enc('{"name": "echo", "arguments": {"text": "hi"}}') + [sid[CALL_END]]
            ids.insert(rng.randrange(len(ids) + 1), sid[rng.choice(SPECIAL_TOKENS)])
        return ids


class FuzzModel(torch.nn.Module):
    """Stands in for the Transformer the Engine drives: hidden() keeps the cache's books (a real
    tiny Transformer does the work when `real`), head() returns logits that favour the plan's next
    token (plan None: no favourite), with noise and now and then values no softmax can take."""

    def __init__(self, tok, plan: Plan | None, rng: random.Random, real: bool):
        super().__init__()
        vocab = tok.vocab_size + 8  # embedding rows with no piece, as padded vocabularies have
        self.cfg = (ModelConfig.preset("tiny", vocab_size=vocab) if real else
                    ModelConfig(vocab_size=vocab, dim=2, n_layers=1, n_heads=1, n_kv_heads=1))
        self.body = Transformer(self.cfg) if real else torch.nn.Embedding(vocab, 2)
        self.real, self.plan, self.rng = real, plan, rng
        self.gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        self.noise, self.boost = rng.choice([0.1, 3.0, 30.0]), rng.choice([0.0, 20.0, 1000.0])
        self.p_bad = rng.choice([0.0, 0.0, 0.0, 0.002, 0.05])  # per forward: logits no softmax can take
        own = {tok.special_ids[t] for t in (CALL, CALL_END, ANSWER, END)}
        self.bait = [i for i in tok.unsampled_ids() if i not in own] + list(range(tok.vocab_size, vocab))

    def hidden(self, x, cache=None):
        if self.real:
            return self.body.hidden(x, cache=cache)
        cache.check_room(x.shape[1])
        h = self.body(x)
        cache.advance(x.shape[1])
        return h

    def head(self, h):
        logits = torch.randn(self.cfg.vocab_size, generator=self.gen) * self.noise
        if self.plan is not None:
            logits[next(self.plan)] += self.boost
        logits[self.bait] += self.rng.choice([0.0, 1e4])  # the sampler must never take these
        if self.rng.random() < self.p_bad:
            value = self.rng.choice([float("nan"), float("inf"), float("-inf"), 3e38, -3e38])
            where = self.rng.choice([slice(None), torch.randint(0, self.cfg.vocab_size, (5,), generator=self.gen)])
            logits[where] = value
        return logits.expand(*h.shape[:-1], self.cfg.vocab_size).clone()


def fuzz_episode(tok, seed: int) -> infer.EpisodeResult:
    """One fuzzed episode, everything drawn from `seed`."""
    rng = random.Random(seed)
    plan = Plan(rng, tok)
    real, forced = rng.random() < 0.05, rng.random() < 0.4  # forced: the plan bypasses sampling
    model = FuzzModel(tok, None if forced else plan, rng, real).eval()
    allowed = TOOLS if rng.random() < 0.8 else rng.sample(TOOLS, 3)  # the others are unknown to the agent
    agent = Agent(model, tok, FuzzWorkflow(), allowed, {"system": rng.choice(["keep", "drop"])})
    engine_kw = dict(max_len=rng.choice([16, 600, 1024] if real else [16, 600, 2048, 16384, 16384, 16384]),
                     mode=rng.choice(["incremental"] * 4 + ["reprefill", "tokenwise"]),
                     prefill_chunk=rng.choice([1, 7, 1024]), temperature=rng.choice([0.0, 0.7, 1.0, 3.0]),
                     top_p=rng.choice([1.0, 0.9, 0.3]))
    episode_kw = dict(max_steps=rng.choice([0, 1, 4, 8, 8, 16]),
                      max_new_tokens=rng.choice([0, 24, 512, 2048, 2048, 2048, 12000]),
                      observation_tokens=rng.choice([0, 16, 1024]), tool_timeout=TIMEOUT,
                      policy=(lambda logits: next(plan)) if forced else None)
    task = agent.workflow.sample_task("test", seed, seed)
    return infer.play_episode(agent, task, seed, seed=seed, engine_kw=engine_kw, episode_kw=episode_kw)


def fuzz(tok, seeds) -> list:
    """Run the seeds' episodes; fail naming every seed whose episode crashed or ended unclassified."""
    results, bad = [], []
    for seed in seeds:
        try:
            r = fuzz_episode(tok, seed)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            bad.append(f"seed {seed} crashed:\n{traceback.format_exc(limit=-3)}")
            continue
        results.append(r)
        if not (r.success and r.failure is None or r.failure in FAILURE_KINDS and not r.success):
            bad.append(f"seed {seed}: success {r.success} with failure {r.failure!r}")
        if r.ended not in ENDINGS:
            bad.append(f"seed {seed}: ended {r.ended!r}")
        try:  # its trace line can be written: UTF-8 text (evaluate writes one per episode)
            json.dumps(asdict(r), ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError) as e:
            bad.append(f"seed {seed}: its trace cannot be written: {type(e).__name__}: {e}")
    assert not bad, (f"{len(bad)} of {len(seeds)} fuzzed episodes went wrong (replay one with "
                     "fuzz_episode(tok, seed)):\n" + "\n".join(bad))
    summary = ev.summarize(results, "test", 0)
    assert sum(summary["failures"].values()) + sum(r.success for r in results) == len(seeds)
    print(f"{len(seeds)} fuzzed episodes: {sum(r.success for r in results)} successes, failures "
          f"{summary['failures']}, errors in calls {summary['errors_in_calls']}")
    return results


N_FAST, N_SLOW = 30, 1000  # episodes (experiments/reliability.py counts them)


def test_fuzzed_episodes_never_crash(calc_corpus):
    results = fuzz(calc_corpus["tok"], range(N_FAST))
    assert len({r.failure for r in results}) >= 4  # the fuzz reaches several ways of failing


@pytest.mark.slow
def test_a_thousand_fuzzed_episodes_never_crash(calc_corpus):
    results = fuzz(calc_corpus["tok"], range(N_SLOW))
    assert set(FAILURE_KINDS) <= {r.failure for r in results}  # every way of failing, reached


# ----------------------------------------------------------------------------- the crashes it found


class Fixed(torch.nn.Module):
    """A model whose logits are always `logits`."""

    def __init__(self, tok, logits):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=tok.vocab_size, dim=2, n_layers=1, n_heads=1, n_kv_heads=1)
        self.body, self.logits = torch.nn.Embedding(tok.vocab_size, 2), logits

    def hidden(self, x, cache=None):
        cache.check_room(x.shape[1])
        cache.advance(x.shape[1])
        return self.body(x)

    def head(self, h):
        return self.logits.expand(*h.shape[:-1], self.cfg.vocab_size).clone()


def episode(tok, out=None, logits=None, max_len=4096, temperature=0.0, **kw) -> infer.EpisodeResult:
    """An episode of the fuzz workflow whose model writes `out` (forced), or samples `logits`."""
    model = Fixed(tok, torch.zeros(tok.vocab_size) if logits is None else logits)
    agent = Agent(model, tok, FuzzWorkflow(), TOOLS, {})
    forced = iter(out or [])
    policy = None if out is None else (lambda logits: next(forced))
    engine = infer.Engine(model, tok, max_len=max_len, temperature=temperature)
    return infer.run_episode(agent, agent.workflow.sample_task("test", 0, 0), engine, policy=policy, **kw)


def test_unreadable_calls_are_invalid_format(calc_corpus):
    """JSON nested past Python's recursion limit (or just under it), an integer of more digits than
    Python converts, half a surrogate pair: each is a call the model reads the error of, and the
    episode goes on."""
    tok = calc_corpus["tok"]
    sid = tok.special_ids
    bodies = ['{"name": "echo", "arguments": {"text": ' + "[" * 3000 + "]" * 3000 + "}}",
              '{"name": "echo", "arguments": {"text": ' + "[" * 980 + "]" * 980 + "}}",  # its schema check recursed
              '{"name": "add", "arguments": {"a": %s, "b": 1}}' % ("9" * 5000),
              '{"name": "echo", "arguments": {"text": "half a pair \\ud800"}}']
    out = [i for b in bodies for i in [sid[CALL]] + tok.encode(b) + [sid[CALL_END]]]
    out += [sid[ANSWER]] + tok.encode("42") + [sid[END]]
    r = episode(tok, out, max_len=20000, max_new_tokens=8000)
    assert [s.observation_kind for s in r.steps] == ["invalid_format"] * 4 + [None]
    assert "nested deeper" in r.steps[0].observation and "nested deeper" in r.steps[1].observation
    assert "digits" in r.steps[2].observation and "surrogate" in r.steps[3].observation
    assert r.ended == "answer" and r.success  # the model recovered


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("case", ["nan", "inf", "-inf"])
def test_logits_no_softmax_can_take_end_the_episode(calc_corpus, temperature, case):
    """NaN anywhere, an infinite favourite, or no finite logit at all: the model is numerically
    broken, and the episode says so instead of sampling garbage or raising."""
    tok = calc_corpus["tok"]
    logits = torch.zeros(tok.vocab_size)
    if case == "inf":
        logits[tok.encode("4")[0]] = float("inf")
    else:
        logits[:] = float(case)
    r = episode(tok, logits=logits, temperature=temperature)
    assert r.failure == r.ended == "bad_logits" and "not finite" in r.reason and r.steps[0].tokens == []


def test_huge_finite_logits_still_sample(calc_corpus):
    """Logits near the float32 limit overflow when divided by a temperature below 1, unless the
    largest is taken off first."""
    tok = calc_corpus["tok"]
    logits = torch.full((tok.vocab_size,), -3e38)
    logits[tok.special_ids[ANSWER]] = 3e38
    e = infer.Engine(Fixed(tok, logits), tok, temperature=0.5)
    assert e.sample(logits) == tok.special_ids[ANSWER]


def test_a_prompt_longer_than_the_cache_is_a_token_limit(calc_corpus):
    r = episode(calc_corpus["tok"], max_len=4)
    assert r.failure == r.ended == "token_limit" and "exceed the cache of 4" in r.reason and r.steps == []


def test_tools_that_raise_anything_or_output_no_text_are_crashes(calc_corpus):
    """A tool raising a BaseException that is no interrupt, or returning half a surrogate pair:
    the model reads an internal error, as for any other bug in a tool."""
    tok = calc_corpus["tok"]
    sid = tok.special_ids
    calls = [("fail", "abort"), ("fail", "generator_exit"), ("odd", "surrogate"), ("odd", "deep")]
    out = [i for name, kind in calls
           for i in [sid[CALL]] + tok.encode(dump_json({"name": name, "arguments": {"kind": kind}})) + [sid[CALL_END]]]
    r = episode(tok, out + [sid[ANSWER]] + tok.encode("42") + [sid[END]], tool_timeout=10)
    assert [s.observation_kind for s in r.steps] == ["crash"] * 4 + [None] and r.success
    assert "Abort: fuzz: abort" in r.steps[0].observation and "surrogates not allowed" in r.steps[2].observation


def test_injected_tokens_in_a_turn_are_invalid_format(calc_corpus):
    """A policy may write what the sampler never does: <|begin|> or <|result|> inside a call."""
    tok = calc_corpus["tok"]
    sid = tok.special_ids
    out = [sid[CALL], sid[BEGIN]] + tok.encode('{"name": "echo", "arguments": {}}') + [sid[RESULT], sid[CALL_END]]
    r = episode(tok, out + [sid[ANSWER], sid[END]])
    assert r.steps[0].observation_kind == "invalid_format" and "only the runtime writes" in r.steps[0].observation
