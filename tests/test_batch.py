"""The batched engine: B episodes on one static KV cache, each row at its own offset, rows leaving
the decode batch while their tools run, finished rows taking the next episode. In float32 an
episode computes the same in a batch as alone: the same tokens, logits within 1e-5. The cached
prefix gives the logits of prefilling the whole prompt."""
import pytest
import torch

from agentc.model.kv_cache import KVCache
from agentc.model.transformer import ModelConfig, Transformer
from agentc.runtime.agent import Agent
from agentc.runtime.engine import Engine
from agentc.runtime.episode import run_batch, run_episode
from agentc.workflows.base import task_seed
from tests.workflow_helpers import teacher_jobs, tiny_sql_agent


@pytest.fixture(scope="module")
def agent(sql_corpus):
    return tiny_sql_agent(sql_corpus["tok"])


def recording(tokens, seen):
    """A policy that forces `tokens` and keeps the logits it was given."""
    it = iter(tokens)

    def policy(logits):
        seen.append(logits.clone())
        return next(it)
    return policy


def same_result(a, b):
    assert (a.ids, a.success, a.failure, a.ended, a.answer) == (b.ids, b.success, b.failure, b.ended, b.answer)
    assert [(s.kind, s.tool, s.arguments, s.observation, s.tokens) for s in a.steps] == \
           [(s.kind, s.tool, s.arguments, s.observation, s.tokens) for s in b.steps]


def test_batched_episodes_compute_what_each_computes_alone(agent):
    """Seven teacher transcripts through three rows (continuous batching: rows take new episodes
    as others finish, at different offsets, with different observation lengths): every logit the
    model produced along each episode equals the one-row run's within 1e-5, and the episodes are
    the same."""
    jobs, tokens = teacher_jobs(agent, 7)
    alone, alone_logits = {}, {}
    for task, i in jobs:
        alone_logits[i] = []
        engine = Engine(agent.model, agent.tok, max_len=2048)
        alone[i] = run_episode(agent, task, engine, policy=recording(tokens[i], alone_logits[i]), max_steps=32)
        assert alone[i].success, alone[i].reason
    batch_logits = {i: [] for _, i in jobs}
    engine = Engine(agent.model, agent.tok, max_len=2048, rows=3)
    order = []
    for i, r in run_batch(agent, jobs, engine, policies=lambda i: recording(tokens[i], batch_logits[i]),
                          max_steps=32):
        order.append(i)
        same_result(r, alone[i])
        assert len(batch_logits[i]) == len(alone_logits[i])
        for x, y in zip(batch_logits[i], alone_logits[i]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert sorted(order) == list(range(7))
    assert order != sorted(order) or len({len(t) for t in tokens.values()}) == 1  # rows finished out of order


@pytest.mark.parametrize("rows, max_len", [(2, 512), (4, 512), (3, 400), (3, 350)])
def test_greedy_batch_equals_one_at_a_time(agent, rows, max_len):
    """A model decoding on its own (greedy, float32; an untrained one writes broken calls, stray
    answers and runs out of tokens at different steps, so rows finish early and at different
    offsets; with 400 tokens the cache fills mid-turn, with 350 some prompts do not fit): every
    episode's tokens and outcome are those of running it alone."""
    wf = agent.workflow
    jobs = [(wf.sample_task("test", i, task_seed(1, "sql", "test", i)), i) for i in range(6)]
    kw = dict(max_new_tokens=12, max_steps=3)
    alone = {i: run_episode(agent, task, Engine(agent.model, agent.tok, max_len=max_len, seed=1_000_003 + i), **kw)
             for task, i in jobs}
    engine = Engine(agent.model, agent.tok, max_len=max_len, rows=rows)
    got = dict(run_batch(agent, jobs, engine, seed=1, **kw))
    assert sorted(got) == list(range(6))
    for i in got:
        same_result(got[i], alone[i])
    assert len({len(r.ids) for r in got.values()}) > 1  # episodes of different lengths shared the batch


def test_sampled_batch_follows_each_episode_seed(agent):
    """With temperature, an episode samples from its own generator (seeded by its index), so a
    batch draws what the episodes draw alone."""
    wf = agent.workflow
    jobs = [(wf.sample_task("test", i, task_seed(1, "sql", "test", i)), i) for i in range(4)]
    kw = dict(max_new_tokens=10, max_steps=2)
    alone = {i: run_episode(agent, task, Engine(agent.model, agent.tok, max_len=256, temperature=1.0,
                                                  seed=1_000_003 + i), **kw) for task, i in jobs}
    engine = Engine(agent.model, agent.tok, max_len=256, rows=3, temperature=1.0)
    for i, r in run_batch(agent, jobs, engine, seed=1, **kw):
        same_result(r, alone[i])


def test_cached_prefix_gives_the_whole_prompts_logits(agent):
    """The agent's fixed prefix is prefilled once and copied into each new row; the logits after
    the rest of the prompt equal those of prefilling the whole prompt, for the first row that
    computes the prefix and for a later one that copies it."""
    torch.manual_seed(1)
    ids = torch.randint(0, agent.tok.vocab_size - 40, (50,)).tolist()
    whole = Engine(agent.model, agent.tok, max_len=128).feed(ids, first=True)
    engine = Engine(agent.model, agent.tok, max_len=128, rows=3)
    first = engine.feed(ids, first=True, row=2, prefix=30)
    other = ids[:30] + ids[30:][::-1]
    second = engine.feed(other, first=True, row=0, prefix=30)
    torch.testing.assert_close(first, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, Engine(agent.model, agent.tok, max_len=128).feed(other, first=True),
                               rtol=0, atol=1e-5)
    assert engine.rows[0].stats["prefix_tokens"] == 30 and engine.rows[0].stats["prefill_tokens"] == 20
    assert engine.cache.lengths == [50, 0, 50]


def test_cache_rows_attend_only_to_themselves():
    """Several rows at different offsets decode one token each in one forward: each gets the
    logits of its own sequence's full forward (rows not bound are left alone)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=50, sliding_window=5)
    model = Transformer(cfg).eval()
    seqs = {1: torch.randint(0, 50, (9,)), 3: torch.randint(0, 50, (4,)), 0: torch.randint(0, 50, (7,))}
    cache = KVCache(cfg, 16, batch=4)
    with torch.no_grad():
        for row, s in seqs.items():
            cache.bind([row])
            model.hidden(s[None, :-1], cache=cache)
        cache.bind([3, 0, 1])  # bound out of order, row 2 idle
        h = model.hidden(torch.stack([seqs[r][-1] for r in (3, 0, 1)])[:, None], cache=cache)
        for j, row in enumerate((3, 0, 1)):
            torch.testing.assert_close(model.head(h[j, 0]), model(seqs[row][None])[0, -1], rtol=0, atol=1e-5)
    assert cache.lengths == [7, 9, 0, 4]


def test_batched_engine_refuses_baseline_modes(agent):
    with pytest.raises(ValueError, match="incremental"):
        Engine(agent.model, agent.tok, rows=2, mode="reprefill")


class Biased(torch.nn.Module):
    """A model whose logits get a fixed bias (here: towards opening and closing calls)."""

    def __init__(self, model, bias):
        super().__init__()
        self.m, self.cfg, self.bias = model, model.cfg, bias

    def hidden(self, x, cache=None):
        return self.m.hidden(x, cache=cache)

    def head(self, h):
        return self.m.head(h) + self.bias


def test_constrained_calls_never_fail_on_format(agent):
    """An untrained model pushed to write calls, sampling at temperature 1: unconstrained, its calls
    are broken JSON; with the schema constraint, no episode fails on format, an unknown tool or bad
    arguments, and the calls reach the tools (which may still reject a value)."""
    from agentc.runtime import evaluate as ev
    tok, wf = agent.tok, agent.workflow
    env = wf.make_env(wf.sample_task("test", 0, 0))
    schemas = [t.schema() for t in env.tools()]
    env.close()
    bias = torch.zeros(agent.model.cfg.vocab_size)
    bias[[tok.special_ids["<|call|>"], tok.special_ids["<|/call|>"]]] = 30.0
    bias[[i for i in range(tok.vocab_size) if tok.decode([i]) and set(tok.decode([i])) <= set('"}{, :')]] = 3.0
    pushed = Agent(Biased(agent.model, bias), tok, wf, agent.tools, {}, "", schemas)
    run = lambda constrain: ev.evaluate(pushed, episodes=6, progress=False, batch=3,  # noqa: E731 (rows reused)
                                        engine_kw={"constrain": constrain, "temperature": 1.0},
                                        episode_kw={"max_new_tokens": 64, "max_steps": 3})
    free, constrained = run(False), run(True)
    assert free["failures"]["invalid_format"] > 0
    assert constrained["failures"]["invalid_format"] == constrained["failures"]["unknown_tool"] == 0
    assert constrained["failures"]["bad_arguments"] == 0
    assert not {"invalid_format", "unknown_tool", "bad_arguments"} & set(constrained["errors_in_calls"])
    assert constrained["mean_steps"] > 1  # calls ran: under the constraint only a call lets an episode go on
