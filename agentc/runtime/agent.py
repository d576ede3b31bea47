"""The compiled-agent directory: what train.py writes with every checkpoint, and what infer.py,
the evaluation and the exporters read.

    out/run/                      a train.py --out directory
      latest                      the name of its newest complete checkpoint
      step_001700/                a checkpoint, which is a compiled agent:
        model.safetensors         the weights            (agentc.model.checkpoint)
        config.json               the model's shape
        tokenizer.model           the tokenizer the data was packed with (or tokenizer.bpe.json)
        agent.json                the token-layout version, the tokenizer's fingerprint, whether
                                  the system prompt was packed, each workflow with its tools and
                                  constructor arguments, and a training summary
        meta.json, optim_rank*.pt training state for train.py --resume; not needed to run the agent

Everywhere a compiled agent is asked for, a train.py --out directory works too: its `latest`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch

from agentc.data.format import LAYOUT_VERSION
from agentc.data.tokenizer import AGENT_TOKENIZER_FILES, Tokenizer, agent_tokenizer_name, load_tokenizer
from agentc.model import checkpoint
from agentc.util import read_json, write_json
from agentc.workflows.base import Workflow, load_workflow

REQUIRED = ("model.safetensors", "config.json", "agent.json")


def latest(path: str) -> str | None:
    """The checkpoint that `path/latest` names, None when there is no such pointer."""
    pointer = os.path.join(path, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        target = os.path.join(path, f.read().strip())
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{pointer} names {target}, which does not exist")
    return target


def resolve(path: str) -> str:
    """A checkpoint directory as given, or the newest checkpoint of a train.py --out directory."""
    return latest(path) or path


def write(directory: str, data_summary: dict, training: dict, tokenizer_path: str | None) -> None:
    """The agent's own files next to the weights: the tokenizer the data was packed with and
    agent.json. data_summary: agentc.data.pack's OUT.json; training: what train.py reports."""
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(directory, agent_tokenizer_name(tokenizer_path)))
    write_json(os.path.join(directory, "agent.json"), {
        "layout_version": LAYOUT_VERSION, "workflows": data_summary.get("workflows", []),
        "tokenizer": data_summary.get("tokenizer"), "system": data_summary.get("system", "keep"),
        "training": training}, indent=1)


def read_meta(path: str) -> dict:
    """agent.json of the agent at `path` (resolved), after checking the directory is a whole agent
    whose token layout this code speaks."""
    path = resolve(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a compiled agent: "
                                f"{'a file, not a directory' if os.path.exists(path) else 'no such directory'}")
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} is not a compiled agent: {name} is missing")
    meta = read_json(os.path.join(path, "agent.json"))
    flows = meta.get("workflows") or []
    if not isinstance(flows, list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str)
                                              and isinstance(w.get("tools"), list) for w in flows):
        raise ValueError(f"{path}/agent.json: \"workflows\" is not a list of objects with a name and tools")
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(f"{path} was trained on token layout {meta.get('layout_version')}; this runtime "
                         f"speaks {LAYOUT_VERSION}")
    return meta


def tokenizer(path: str, meta: dict | None = None) -> Tokenizer:
    """The tokenizer the agent at `path` carries, checked against the fingerprint it was trained
    with (meta: its agent.json, when the caller has read it)."""
    path = resolve(path)
    names = [n for n in AGENT_TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
    if not names:
        raise FileNotFoundError(f"{path} is not a compiled agent: it has no tokenizer "
                                f"({' or '.join(AGENT_TOKENIZER_FILES)})")
    tok = load_tokenizer(os.path.join(path, names[0]))
    if meta is None and os.path.isfile(os.path.join(path, "agent.json")):
        meta = read_meta(path)
    want = ((meta or {}).get("tokenizer") or {}).get("fingerprint")
    if want and want != tok.fingerprint:
        raise ValueError(f"{tok.path} is not the tokenizer the agent was trained with")
    return tok


def workflow_names(path: str) -> list[str]:
    """The workflows the agent was trained on, most trajectories first."""
    return [w["name"] for w in read_meta(path).get("workflows") or []]


def workflow_of(entry: dict) -> Workflow:
    """The workflow an agent.json (or data.pack summary) entry names, built with the arguments its
    training data was made with (its test split depends on them)."""
    return load_workflow(entry.get("module") or entry["name"], **entry.get("kwargs", {}))


@dataclass
class Agent:
    model: torch.nn.Module
    tok: Tokenizer
    workflow: Workflow
    tools: list[str]           # the allowlist: tool names the agent may call
    meta: dict                 # agent.json
    path: str = ""
    schemas: list[dict] = field(default_factory=list)  # the tools' OpenAI entries (for constrained calls)


def load(path: str, device="cpu", workflow: str | None = None, attention: str = "auto") -> Agent:
    """The agent at `path` with one of its workflows (default: its first) on `device`; attention:
    the model's attention backend (agentc.model.transformer.BACKENDS)."""
    from agentc.model.transformer import resolve_backend
    resolve_backend(attention, device)  # refuse one that cannot run there before loading anything
    path = resolve(path)
    meta = read_meta(path)
    tok = tokenizer(path, meta)
    flows = meta.get("workflows") or []
    if not flows:
        raise ValueError(f"{path}/agent.json names no workflow")
    pick = next((w for w in flows if w["name"] == workflow), None) if workflow else flows[0]
    if pick is None:
        raise ValueError(f"{path} knows the workflows {[w['name'] for w in flows]}, not {workflow!r}")
    model = checkpoint.load(path, device=device).eval()
    model.cfg.attention = attention
    try:
        wf = workflow_of(pick)
    except (ValueError, ImportError, TypeError) as e:
        raise ValueError(f"{path}/agent.json: workflow {pick['name']!r}: {e}") from None
    env = wf.make_env(wf.sample_task("test", 0, 0))
    try:
        live = [t.schema() for t in env.tools()]
    finally:
        env.close()
    if json.dumps(live, sort_keys=True) != json.dumps(pick["tools"], sort_keys=True):
        print(f"WARNING: the tools of workflow {pick['name']!r} changed since this agent was trained; it runs "
              "with today's code and schemas", file=sys.stderr)
    return Agent(model, tok, wf, [t["function"]["name"] for t in pick["tools"]], meta, path, pick["tools"])


def from_data(model: torch.nn.Module, data_summary: dict, tokenizer_path: str | None) -> list[Agent]:
    """One agent around `model` per workflow of a packed data set (agentc.data.pack's summary, and
    the tokenizer it packed with): what train.py evaluates while it trains, before any agent
    directory exists. ValueError when the summary names no workflow or the tokenizer is missing."""
    flows = data_summary.get("workflows") or []
    if not flows or not tokenizer_path:
        raise ValueError("the data's summary names no workflow, or its tokenizer is missing")
    tok = load_tokenizer(tokenizer_path)
    return [Agent(model, tok, workflow_of(f), [t["function"]["name"] for t in f["tools"]],
                  {"system": data_summary.get("system", "keep")}, "", f["tools"]) for f in flows]
