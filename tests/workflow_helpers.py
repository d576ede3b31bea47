"""What the workflow tests (test_sql, test_files, test_shop, test_support, test_code) share: task i
of a split is drawn with the seed task_seed(0, workflow, split, i); the workflow and its teacher's
episodes are module fixtures; calls are read off an episode's messages; and a digest of the first
tasks' transcripts must come out the same in a fresh process under another PYTHONHASHSEED."""
import functools
import hashlib
import json
import os
import subprocess
import sys

import pytest

from agentc.workflows.base import SPLITS, load_workflow, run_teacher, task_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeds(name: str):
    """seed_of(split, i): the seed of the workflow's task i in that split."""
    return functools.partial(task_seed, 0, name)


def workflow_fixtures(name: str, n_tasks: int):
    """The module fixtures `wf` (the workflow with its defaults) and `episodes` (split -> the
    teacher's episodes on the split's first n_tasks tasks). A test module takes them with
    `wf, episodes = workflow_fixtures(NAME, N_TASKS)`."""
    seed_of = seeds(name)

    @pytest.fixture(scope="module", name="wf")
    def wf_fixture():
        return load_workflow(name)

    @pytest.fixture(scope="module", name="episodes")
    def episodes_fixture(wf):
        return {split: [run_teacher(wf, wf.sample_task(split, i, seed_of(split, i))) for i in range(n_tasks)]
                for split in SPLITS}
    return wf_fixture, episodes_fixture


def calls(ep, trained_only: bool = False) -> list[tuple[str, dict]]:
    """(tool name, arguments) of each call the episode's assistant made; with trained_only, not the
    deliberate mistakes (weight 0)."""
    return [(m["tool_calls"][0]["function"]["name"], json.loads(m["tool_calls"][0]["function"]["arguments"]))
            for m in ep.messages if m.get("tool_calls") and (not trained_only or m.get("weight", 1))]


def digest(name: str, split: str, n: int, wf=None) -> str:
    """sha256 of the first n tasks of the split and their teacher transcripts, drawn from `wf` (a
    fresh instance of the workflow when None)."""
    wf, seed_of, h = wf or load_workflow(name), seeds(name), hashlib.sha256()
    for i in range(n):
        ep = run_teacher(wf, wf.sample_task(split, i, seed_of(split, i)))
        h.update(json.dumps([ep.task.to_dict(), ep.messages], sort_keys=True).encode())
    return h.hexdigest()


def assert_same_digest_in_another_process(name: str, split: str, n: int, hash_seed: str, wf):
    """digest() of `wf`, the module's instance that earlier tests have used (so state left behind
    between tasks shows too), equals digest() in a fresh process with PYTHONHASHSEED=hash_seed."""
    code = f"from tests.workflow_helpers import digest; print(digest({name!r}, {split!r}, {n}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONHASHSEED=hash_seed))
    assert out.stdout.strip() == digest(name, split, n, wf)


def tiny_sql_agent(tok):
    """An untrained `tiny` model as an agent of the SQL workflow (its three tools, no schemas)."""
    import torch

    from agentc.model.transformer import ModelConfig, Transformer
    from agentc.runtime.agent import Agent
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    return Agent(model, tok, load_workflow("sql"), ["list_tables", "describe_table", "run_sql"], {})


def teacher_jobs(agent, n):
    """n SQL tasks with the model tokens of their teacher transcripts (several calls each, with
    observations of different lengths; the teacher's injected mistakes make some longer)."""
    from agentc.data.format import SRC_MODEL, render
    jobs, tokens = [], {}
    for i in range(n):
        task = agent.workflow.sample_task("test", i, task_seed(7, "sql", "test", i))
        ref = render({"messages": run_teacher(agent.workflow, task).messages}, agent.tok)
        jobs.append((task, i))
        tokens[i] = ref.ids[ref.sources == SRC_MODEL].tolist()
    return jobs, tokens
