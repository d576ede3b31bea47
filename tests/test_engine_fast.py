"""The engine's speed options change nothing a greedy episode writes: compiled decode steps, a
bfloat16 KV cache's rounding aside, prompt-lookup drafts (kept only where the model would have
written them), the batched argmax read. A compile failure falls back to eager with one warning."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from agentc.runtime import engine as engine_mod
from agentc.runtime.agent import Agent
from agentc.runtime.engine import Engine, lookup_draft
from agentc.runtime.episode import make_engine, run_batch, run_episode
from agentc.workflows.base import task_seed
from tests.workflow_helpers import teacher_jobs, tiny_sql_agent

EAGER = {"compile": False, "draft": 0}
FAST = {"compile": True, "draft": 4}


@pytest.fixture(scope="module")
def agent(sql_corpus):
    return tiny_sql_agent(sql_corpus["tok"])


class Pushed(torch.nn.Module):
    """A model whose logits favour <|call|> and JSON punctuation (an untrained model never calls)."""

    def __init__(self, m, bias):
        super().__init__()
        self.m, self.bias, self.cfg = m, bias, m.cfg

    def hidden(self, *a, **kw):
        return self.m.hidden(*a, **kw)

    def head(self, h):
        return self.m.head(h) + self.bias


def pushed_to_call(agent):
    tok, wf = agent.tok, agent.workflow
    env = wf.make_env(wf.sample_task("test", 0, 0))
    schemas = [t.schema() for t in env.tools()]
    env.close()
    bias = torch.zeros(agent.model.cfg.vocab_size)
    bias[tok.special_ids["<|call|>"]] = 30.0
    bias[[i for i in range(tok.vocab_size) if tok.decode([i]) and set(tok.decode([i])) <= set('"}{, :')]] = 3.0
    return Agent(Pushed(agent.model, bias), tok, wf, agent.tools, {}, "", schemas)


def oracle(runs):
    """A drafter that knows the episodes `runs` and gets every third token wrong."""
    def draft(ids, grams, k):
        for r in runs.values():
            if r.ids[:len(ids)] == ids:
                return [t if (len(ids) + j) % 3 else 1 + t for j, t in enumerate(r.ids[len(ids):len(ids) + k])]
        return []
    return draft


def key(r):
    return (r.ids, r.success, r.failure, r.ended, r.answer, [(s.kind, s.tool, s.arguments, s.tokens) for s in r.steps])


def test_lookup_draft_copies_what_followed_the_last_ngram():
    ids = [5, 6, 7, 8, 9, 1, 2, 6, 7]
    grams = {}
    assert lookup_draft(ids, grams, 3) == [8, 9, 1]          # "6 7" was followed by 8 9 1
    assert lookup_draft(ids + [8, 9], grams, 2) == [1, 2]     # "7 8 9" (three tokens) wins; the index grew
    assert lookup_draft([1, 2, 3], {}, 4) == []
    assert lookup_draft([4, 4, 4, 4], {}, 2) == [4]           # the latest earlier occurrence


@pytest.mark.parametrize("rows,max_len,constrain", [(1, 512, False), (3, 400, True), (3, 350, False)])
def test_greedy_episodes_identical_with_every_option_on_and_off(agent, rows, max_len, constrain, monkeypatch):
    """An untrained model decoding greedily (broken calls, stray answers, the cache filling
    mid-turn at 400 tokens, prompts that do not fit at 350): compiled steps with 4-token drafts
    write every episode exactly as the eager engine without drafts does. An untrained model never
    repeats itself, so the drafts come from an oracle that knows the eager episodes and gets every
    third token wrong: drafts are kept, cut short and refused, at every offset."""
    wf = agent.workflow
    jobs = [(wf.sample_task("test", i, task_seed(1, "sql", "test", i)), i) for i in range(6)]
    kw = {"max_new_tokens": 24, "max_steps": 3}
    fast_opts = FAST
    if constrain:  # a model pushed to open calls, so the grammar picks tokens (a wrapper: drafts on the eager path)
        agent, fast_opts = pushed_to_call(agent), {**FAST, "compile": False}
    eager = dict(run_batch(agent, jobs, make_engine(agent, rows=rows, constrain=constrain, max_len=max_len, **EAGER),
                           **kw))

    monkeypatch.setattr(engine_mod, "lookup_draft", oracle(eager))
    fast = dict(run_batch(agent, jobs, make_engine(agent, rows=rows, constrain=constrain, max_len=max_len, **fast_opts),
                          **kw))
    assert {i: key(r) for i, r in eager.items()} == {i: key(r) for i, r in fast.items()}
    drafted = sum(r.stats["drafted"] for r in fast.values())
    accepted = sum(r.stats["accepted"] for r in fast.values())
    decoded = sum(r.stats["decode_tokens"] for r in fast.values())
    assert 0 < accepted < drafted or decoded < 20  # at 350 tokens most prompts leave no room


def test_drafts_verified_against_forced_transcripts(agent):
    """Teacher transcripts forced through the model: the transcripts copy ids and names from the
    observations, so drafts are accepted, and the logits each forced token was chosen from equal
    the one-token-at-a-time logits."""
    jobs, tokens = teacher_jobs(agent, 4)

    def forcing(i, seen):
        it = iter(tokens[i])

        def policy(logits):
            seen.append(logits.clone())
            return next(it)
        return policy
    logits = {}
    for name, opts in (("eager", EAGER), ("fast", FAST)):
        logits[name] = {i: [] for _, i in jobs}
        engine = Engine(agent.model, agent.tok, max_len=2048, rows=2, **opts)
        got = dict(run_batch(agent, jobs, engine, policies=lambda i: forcing(i, logits[name][i]), max_steps=32))  # noqa: B023
        assert all(r.success for r in got.values())
    accepted = sum(r.stats["accepted"] for r in got.values())
    assert accepted > 0.2 * sum(r.stats["decode_tokens"] for r in got.values())
    for i in logits["eager"]:
        assert len(logits["eager"][i]) == len(logits["fast"][i])
        for a, b in zip(logits["eager"][i], logits["fast"][i]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


class CountReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (each one a device sync on a GPU)."""
    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func in self.READS
        return func(*args, **(kwargs or {}))


def test_one_read_per_step_for_greedy_rows(agent):
    """Greedy decoding of three rows reads the logits into Python once per step: the argmax and
    the finiteness check of every row come back together."""
    engine = Engine(agent.model, agent.tok, max_len=128, rows=3, compile=False)
    for row in range(3):
        engine.start(row, row)
        engine.begin_turn(row, engine.feed([3 + row, 9, 4], first=True, row=row), 5)
    for _ in range(3):
        with CountReads() as c:
            engine.step()
        assert c.n == 1


def test_a_failing_compile_warns_once_and_decodes_eagerly(agent, monkeypatch, capsys):
    wf = agent.workflow
    task = wf.sample_task("test", 0, task_seed(1, "sql", "test", 0))
    want = run_episode(agent, task, Engine(agent.model, agent.tok, max_len=512, compile=False), max_new_tokens=12)

    def broken(self, tokens, rows, kind=None):
        raise RuntimeError("InductorError: C++ compile error\nmore lines")
    monkeypatch.setattr(engine_mod, "_warned", set())
    monkeypatch.setattr("agentc.model.decode.DecodeGraphs.__call__", broken)
    engine = Engine(agent.model, agent.tok, max_len=512, compile=True)
    got = run_episode(agent, task, engine, max_new_tokens=12)
    assert key(got) == key(want) and engine.graphs is None
    out = capsys.readouterr().out
    assert out.count("WARNING: the compiled decode step failed (RuntimeError: InductorError: C++ compile error); "
                     "decoding eagerly") == 1


def test_bad_options_name_themselves(agent):
    with pytest.raises(ValueError, match="unknown kv_dtype 'fp8'"):
        Engine(agent.model, agent.tok, kv_dtype="fp8")
    with pytest.raises(ValueError, match="draft must be 0"):
        Engine(agent.model, agent.tok, draft=-1)


@pytest.mark.parametrize("max_len", [2048, 420])
def test_interleaved_prefill_changes_no_episode(agent, max_len, monkeypatch):
    """Observations prefilled 8 tokens at a time between the other rows' decode steps: the same
    episodes, logits within 1e-5, as prefilling each in one go; with 420 tokens some observation
    does not fit and its episode ends as token_limit either way, before any part of it is fed."""
    jobs, tokens = teacher_jobs(agent, 5)
    parts = []
    feed = Engine.feed

    def counting(self, ids, *a, **kw):
        parts.append(len(ids))
        return feed(self, ids, *a, **kw)
    monkeypatch.setattr(Engine, "feed", counting)
    runs, seen = {}, {}
    for interleave in (0, 8):
        seen[interleave] = {i: [] for _, i in jobs}

        def forcing(i, log=seen[interleave]):
            it = iter(tokens[i])

            def policy(logits):
                log[i].append(logits.clone())
                return next(it, tokens[i][-1])
            return policy
        engine = Engine(agent.model, agent.tok, max_len=max_len, rows=3, interleave=interleave, compile=False)
        runs[interleave] = dict(run_batch(agent, jobs, engine, policies=forcing, max_steps=32))
    assert {i: key(r) for i, r in runs[0].items()} == {i: key(r) for i, r in runs[8].items()}
    for i in seen[0]:
        for a, b in zip(seen[0][i], seen[8][i], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert parts.count(8) > (10 if max_len == 2048 else 0)  # observations did go in parts
    if max_len == 420:
        assert any(r.ended == "token_limit" and r.steps for r in runs[8].values())


def test_sampled_episodes_identical_with_drafts(agent, monkeypatch):
    """At temperature 1 a row draws one sample per token it writes, drafts or not (the pick that
    refuses a draft is the next token, not drawn again), so with the same seeds the episodes are
    the same. Drafts from an oracle of the draftless run, every third token wrong."""
    wf = agent.workflow
    jobs = [(wf.sample_task("test", i, task_seed(1, "sql", "test", i)), i) for i in range(4)]
    kw = {"max_new_tokens": 20, "max_steps": 2}
    plain = dict(run_batch(agent, jobs, Engine(agent.model, agent.tok, max_len=512, rows=2, temperature=1.0,
                                               **EAGER), **kw))

    monkeypatch.setattr(engine_mod, "lookup_draft", oracle(plain))
    drafted = dict(run_batch(agent, jobs, Engine(agent.model, agent.tok, max_len=512, rows=2, temperature=1.0,
                                                 compile=False, draft=4), **kw))
    assert {i: key(r) for i, r in plain.items()} == {i: key(r) for i, r in drafted.items()}
    assert sum(r.stats["accepted"] for r in drafted.values()) > 0
