"""The runtime: interrupt/resume through the KV cache computes what one full forward computes,
its token stream is what agentc/data/format.py renders (no drift), bad calls become observations,
evaluation summarises and traces every episode, and the compiled agent directory runs from the
command line."""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

import infer
from agentc.data import pack
from agentc.data.format import ANSWER, CALL, CALL_END, END, SRC_MODEL, render
from agentc.model.transformer import ModelConfig, Transformer
from agentc.runtime import evaluate as ev
from agentc.runtime.episode import FAILURE_KINDS, EpisodeResult
from agentc.runtime.agent import Agent
from agentc.workflows.base import Environment, Task, Verdict, Workflow, load_workflow, run_teacher, task_seed, tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def agent(sql_corpus):
    torch.manual_seed(0)
    tok = sql_corpus["tok"]
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    wf = load_workflow("sql")
    return Agent(model, tok, wf, ["list_tables", "describe_table", "run_sql"], {})


def teacher_episode(wf, index):
    task = wf.sample_task("test", index, task_seed(7, wf.name, "test", index))
    ep = run_teacher(wf, task)
    assert ep.failure is None
    return task, ep


def forced(ids):
    """A policy that emits the given tokens in order, whatever the logits say."""
    it = iter(ids)
    return lambda logits: next(it)


@pytest.mark.parametrize("mode", ["incremental", "reprefill", "tokenwise"])
def test_interrupt_resume_equals_one_forward_and_renders_back(agent, mode):
    """Replay teacher episodes (several calls, observations far longer than the 8-token chunks)
    through the runtime with the real tools: every logit along the way equals one forward over the
    final sequence, and the stream equals render() of the episode's messages."""
    for index in ((0, 1, 2) if mode == "incremental" else (0,)):  # the baselines are slow by design
        task, ep = teacher_episode(agent.workflow, index)
        ref = render({"messages": ep.messages}, agent.tok)
        model_tokens = ref.ids[ref.sources == SRC_MODEL].tolist()
        engine = infer.Engine(agent.model, agent.tok, max_len=2048, mode=mode, prefill_chunk=8, record=True)
        r = infer.run_episode(agent, task, engine, policy=forced(model_tokens), max_steps=32)
        assert r.success and r.failure is None and r.answer == ep.answer
        n_calls = sum(s.kind == "call" for s in r.steps)
        assert n_calls >= 3 and max(len(agent.tok.encode(s.observation)) for s in r.steps if s.observation) > 8
        # no drift: the runtime's tokens are the training layout's tokens
        assert r.ids == ref.ids.tolist()
        assert render({"messages": r.messages}, agent.tok).ids.tolist() == r.ids
        # interrupt/resume = one forward: logits of every fed position (the final <|end|> is never fed)
        with torch.no_grad():
            full = agent.model(torch.tensor([r.ids[:-1]]))[0]
        covered = torch.zeros(len(full), dtype=torch.bool)
        for pos, logits in engine.logits:  # in reprefill mode, positions are computed again and again
            torch.testing.assert_close(logits, full[pos:pos + len(logits)], rtol=1e-5, atol=1e-5)
            covered[pos:pos + len(logits)] = True
        assert covered.all()
        if mode == "incremental":
            assert r.stats["forward_tokens"] == len(r.ids) - 1  # every token once: nothing re-encoded
        if mode == "reprefill":
            assert r.stats["prefill_tokens"] == r.stats["reencode_tokens"] > 2 * len(r.ids)


def test_an_agent_trained_without_system_messages_gets_none(agent):
    """agentc.data.pack --system drop: the runtime leaves the system turn out too, and the stream still
    equals what render() gives for the episode's (system-less) messages."""
    lean = Agent(agent.model, agent.tok, agent.workflow, agent.tools, {"system": "drop"})
    task, ep = teacher_episode(agent.workflow, 0)
    ref = render({"messages": ep.messages[1:]}, agent.tok)
    engine = infer.Engine(agent.model, agent.tok, max_len=2048)
    r = infer.run_episode(lean, task, engine, policy=forced(ref.ids[ref.sources == SRC_MODEL].tolist()))
    assert r.success and r.messages[0]["role"] == "user"
    assert r.ids == ref.ids.tolist() and agent.tok.special_ids["<|system|>"] not in r.ids


def test_bad_calls_become_observations(agent):
    tok, sid = agent.tok, agent.tok.special_ids
    task, _ = teacher_episode(agent.workflow, 3)
    out = ([sid[CALL]] + tok.encode("not json") + [sid[CALL_END]]
           + [sid[CALL]] + tok.encode('{"name": "drop_database", "arguments": {}}') + [sid[CALL_END]]
           + [sid[CALL]] + tok.encode('{"name": "run_sql", "arguments": {"sql": "x"}}') + [sid[CALL_END]]
           + [sid[ANSWER]] + tok.encode("42") + [sid[END]])
    r = infer.run_episode(agent, task, infer.Engine(agent.model, tok), policy=forced(out))
    kinds = [s.observation_kind for s in r.steps]
    assert kinds == ["invalid_format", "unknown_tool", "bad_arguments", None]
    assert "not valid JSON" in r.steps[0].observation and "unknown tool" in r.steps[1].observation
    assert r.ended == "answer" and not r.success and r.failure == "invalid_format"  # the first thing that went wrong
    assert r.messages[2] == {"role": "assistant", "invalid_call": "not json"} and not r.canonical
    assert [m.get("content", "")[:6] for m in r.messages[3:8:2]] == ["Error:"] * 3  # each error is in the transcript


def test_random_model_fails_cleanly_and_summarises(agent, tmp_path):
    """An untrained model samples garbage: every episode ends with a failure kind, none crashes."""
    traces = tmp_path / "t.jsonl"
    s = ev.evaluate(agent, episodes=4, traces=str(traces), progress=False,
                    episode_kw={"max_new_tokens": 24, "max_steps": 3})
    assert s["episodes"] == 4 and s["success_rate"] == 0
    lines = [json.loads(x) for x in open(traces)]
    assert len(lines) == 4 and all(x["steps"] and x["steps"][0]["tokens"] for x in lines)
    assert all(x["failure"] in FAILURE_KINDS for x in lines)
    assert s["failures"] == {k: sum(x["failure"] == k for x in lines) for k in FAILURE_KINDS}
    assert s["decode_tokens"] > 0 and s["decode_tokens_per_s"] > 0
    # a mixture agent's summaries combine: each workflow counts the same, failures add up
    both = ev.combine({"a": s, "b": {**s, "success_rate": 1.0, "episodes": 2, "mean_steps": 0.0}})
    assert both["success_rate"] == 0.5 and both["success_rate_by_workflow"] == {"a": 0, "b": 1.0}
    assert both["episodes"] == 6 and both["failures"] == {k: 2 * v for k, v in s["failures"].items()}
    assert both["mean_steps"] == s["mean_steps"] * 4 / 6


def test_repeats_report_pass_k_and_intervals(agent):
    """Every task runs `repeats` times with its own sampling seeds; pass^k counts tasks all k solve."""
    s = ev.evaluate(agent, episodes=3, progress=False, batch=3, repeats=2, engine_kw={"temperature": 1.0},
                    episode_kw={"max_new_tokens": 8, "max_steps": 2})
    assert s["episodes"] == 6 and s["repeats"] == 2 and {"pass^1", "pass^2"} <= set(s)
    assert s["success"]["n"] == 6 and sum(r["n"] for r in s["by_wording"].values()) == 6
    assert s["by_family"] and all(0 <= r["ci95"][0] <= r["rate"] <= r["ci95"][1] <= 1 for r in s["by_family"].values())


def test_wilson_and_pass_k():
    lo, hi = ev.wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3              # the usual 0/10 upper bound
    lo, hi = ev.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    R = EpisodeResult
    rs = [R(t, "", ok, None, "answer", "", "", [], [], [], {}) for t, ok in
          [("a", True), ("a", True), ("a", True), ("a", True), ("b", True), ("b", False), ("b", True), ("b", False)]]
    p = ev.pass_k(rs, 4)
    assert p["pass^1"] == 0.75 and p["pass^4"] == 0.5        # b solves 2 of 4: pass^2 = C(2,2)/C(4,2) = 1/6
    assert abs(p["pass^2"] - (1 + 1 / 6) / 2) < 1e-12


def test_sampling_and_limits(agent):
    sid = agent.tok.special_ids
    banned = [sid[t] for t in sid if t not in (CALL, CALL_END, ANSWER, END)]
    e = infer.Engine(agent.model, agent.tok, max_len=400, temperature=1.0, top_p=0.9, seed=3)
    logits = torch.zeros(agent.tok.vocab_size)
    logits[banned] = 50.0  # the runtime's own tokens are never sampled, however likely
    assert not set(banned) & {e.sample(logits) for _ in range(300)}
    # the layout's grammar: a stop token only closes what was opened, and nothing opens twice
    for opened, allowed, refused in ((None, CALL, CALL_END), (None, ANSWER, END), (sid[CALL], CALL_END, END),
                                     (sid[CALL], CALL_END, ANSWER), (sid[ANSWER], END, CALL_END)):
        logits = torch.zeros(agent.tok.vocab_size)
        logits[sid[refused]], logits[sid[allowed]] = 100.0, 90.0
        assert e.sample(logits, opened) == sid[allowed]
    logits[100], logits[101] = 60.0, 59.0  # top-p 0.9 keeps only the top token here (p = 0.73 + ...)
    peaked = infer.Engine(agent.model, agent.tok, temperature=1.0, top_p=0.5, seed=0)
    assert {peaked.sample(logits) for _ in range(100)} == {100}
    # a model that never stops fills the cache: the episode ends at the token limit, no crash
    task, _ = teacher_episode(agent.workflow, 4)
    r = infer.run_episode(agent, task, e, max_new_tokens=1000, max_steps=2, policy=lambda logits: 100)
    assert r.ended == "token_limit" and r.failure == "token_limit" and e.cache.pos == 400
    assert r.reason == "the cache is full" and len(r.ids) == 400 + 1  # the partial turn is kept
    # a turn that never stops within its budget: also a token limit
    r = infer.run_episode(agent, task, infer.Engine(agent.model, agent.tok), max_new_tokens=20,
                          policy=lambda logits: 100)
    assert r.failure == "token_limit" and len(r.steps) == 1 and len(r.steps[0].tokens) == 20


def test_cut_tokens(agent):
    text = "row " * 500
    cut = infer.cut_tokens(text, agent.tok, 50)
    assert len(agent.tok.encode(cut)) <= 50 and cut.endswith("more characters]") and text.startswith(cut.split("\n…")[0])
    assert infer.cut_tokens("short", agent.tok, 50) == "short"


def test_infer_main_evaluates_and_answers_one_task(trained_run, tmp_path, capsys):
    """infer.py's main, in this process, on a train.py --out directory (the default run's check of
    the command; the test below runs it as processes): --eval writes its summary and a trace per
    episode, --task streams one episode."""
    agent, out, traces = str(trained_run["out"]), tmp_path / "eval.json", tmp_path / "traces.jsonl"
    s = infer.main(["--agent", agent, "--eval", "--episodes", "2", "--max-steps", "2", "--max-new-tokens", "8",
                    "--out", str(out), "--traces", str(traces)])
    assert s["episodes"] == 2 and json.loads(out.read_text())["episodes"] == 2
    assert len(traces.read_text().splitlines()) == 2
    r = infer.main(["--agent", agent, "--task", "What is 2 + 2?", "--max-steps", "1", "--max-new-tokens", "8"])
    assert r.steps and "What is 2 + 2?" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_agent_runs_from_the_command_line(sql_corpus, tmp_path):
    data = tmp_path / "train"
    pack.main([sql_corpus["jsonl"], "--tokenizer", sql_corpus["tokenizer"], "--seq-len", "1024",
               "--out", str(data), "--quiet"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: E731
    p = run("train.py", f"--data={data}", "--model=tiny", "--batch-size=2", "--max-steps=2", "--wandb=disabled",
            f"--out={tmp_path / 'run'}", f"--val-data={data}", "--eval-episodes=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "agent success 0.0% on 2 test tasks" in p.stdout
    ck = tmp_path / "run" / "step_000002"
    meta = json.loads((ck / "agent.json").read_text())
    assert meta["workflows"][0]["module"] == "sql" and meta["training"]["step"] == 2
    assert {t["function"]["name"] for t in meta["workflows"][0]["tools"]} == {"list_tables", "describe_table", "run_sql"}
    p = run("infer.py", f"--agent={tmp_path / 'run'}", "--eval", "--episodes=2", "--max-new-tokens=16",
            "--max-steps=2")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((ck / "eval_test_incremental.json").read_text())
    assert summary["episodes"] == 2 and (ck / "traces_test_incremental.jsonl").exists()
    # two worker processes run the same episodes, and the traces keep task order
    p = run("infer.py", f"--agent={ck}", "--eval", "--episodes=3", "--max-new-tokens=16", "--max-steps=2",
            "--batch=1", "--workers=2", f"--out={tmp_path / 'w2.json'}", f"--traces={tmp_path / 'w2.jsonl'}")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("infer.py", f"--agent={ck}", "--eval", "--episodes=3", "--max-new-tokens=16", "--max-steps=2",
            f"--out={tmp_path / 'w1.json'}", f"--traces={tmp_path / 'w1.jsonl'}")
    assert p.returncode == 0, p.stderr[-2000:]
    w1, w2 = ([json.loads(x) for x in open(tmp_path / f"{w}.jsonl")] for w in ("w1", "w2"))
    assert [(x["task_id"], x["ids"]) for x in w1] == [(x["task_id"], x["ids"]) for x in w2]
    assert json.loads((tmp_path / "w2.json").read_text())["workers"] == 2
    p = run("infer.py", f"--agent={ck}", "--task", "How many customers are there?", "--max-new-tokens=8",
            "--max-steps=1")
    assert p.returncode == 0 and "How many customers" in p.stdout, p.stderr[-2000:]
    os.remove(ck / "agent.json")
    p = run("infer.py", f"--agent={ck}", "--eval")
    assert p.returncode != 0 and "agent.json is missing" in p.stderr and "Traceback" not in p.stderr


def test_engines_do_not_share_a_cache(agent):
    """Two engines on the same model do not share state (a cache belongs to one episode)."""
    a = infer.Engine(agent.model, agent.tok, max_len=64)
    b = infer.Engine(agent.model, agent.tok, max_len=64)
    la = a.feed([5, 6, 7], first=True)
    b.feed([9, 9, 9, 9], first=True)
    lb = infer.Engine(agent.model, agent.tok, max_len=64).feed([5, 6, 7], first=True)
    assert np.allclose(la.numpy(), lb.numpy()) and a.cache.pos == 3 and b.cache.pos == 4


class SlowEnv(Environment):
    @tool
    def wait(self, seconds: float) -> str:
        """Sleep, then say so.

        Args:
            seconds: How long to sleep.
        """
        time.sleep(seconds)
        return "done"


class SlowWorkflow(Workflow):
    name, instructions = "slow", "Wait when asked."

    def sample_task(self, split, index, seed):
        return Task("slow", split, index, seed, "wait", "Wait a bit.", {})

    def make_env(self, task):
        return SlowEnv()

    def check(self, task, env, answer):
        return Verdict(True)


def test_a_tool_past_its_timeout_ends_the_episode(agent):
    slow = Agent(agent.model, agent.tok, SlowWorkflow(), ["wait"], {})
    sid, tok = agent.tok.special_ids, agent.tok
    call = lambda s: [sid[CALL]] + tok.encode('{"name": "wait", "arguments": {"seconds": %s}}' % s) + [sid[CALL_END]]  # noqa: E731
    task = SlowWorkflow().sample_task("test", 0, 0)
    r = infer.run_episode(slow, task, infer.Engine(agent.model, tok), tool_timeout=5,
                          policy=forced(call(0.01) + [sid[ANSWER]] + tok.encode("ok") + [sid[END]]))
    assert r.success and r.steps[0].observation == "done"
    r = infer.run_episode(slow, task, infer.Engine(agent.model, tok), tool_timeout=0.2, policy=forced(call(3)))
    assert r.failure == r.ended == "tool_timeout" and "did not finish within 0.2 s" in r.steps[0].observation
    assert r.messages[-1]["content"] == r.steps[0].observation


def test_trace_report_reads_a_repeated_failing_call_off_the_traces(agent, tmp_path):
    """experiments/trace_report.py: a greedy loop that sends the same failing call again shows up as
    "repeated the call", with the tool's error counted by message and success by family."""
    from experiments import trace_report
    tok, sid = agent.tok, agent.tok.special_ids
    task, _ = teacher_episode(agent.workflow, 5)
    bad = [sid[CALL]] + tok.encode('{"name": "run_sql", "arguments": {"query": "SELECT nope FROM nowhere"}}') + \
        [sid[CALL_END]]
    r = infer.run_episode(agent, task, infer.Engine(agent.model, tok, max_len=1024),
                          policy=forced(bad + bad + [sid[ANSWER]] + tok.encode("42") + [sid[END]]))
    assert [s.observation_kind for s in r.steps] == ["tool_error", "tool_error", None]
    trace = tmp_path / "traces.jsonl"
    trace.write_text(json.dumps(asdict(r)) + "\n")
    rep = trace_report.report(str(trace))
    assert rep["after_first_error"] == {"repeated the call": 1} and rep["tool_errors"] == 2
    assert rep["top_errors"] == {"no such table: nowhere": 2} and rep["by_family"] == {task.family: [0, 1]}
