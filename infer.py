"""Run a compiled agent: one episode streamed, or an evaluation on fresh tasks.

    python infer.py --agent out/sql_mini --task "How many customers live in Lyon?"   # one episode, streamed
    python infer.py --agent out/sql_mini --eval --episodes 200 --batch 16            # success rate, latency
    python infer.py --agent out/mix --eval --workflow all                            # each workflow of a mixture
    torchrun --nproc_per_node=8 infer.py --agent out/sql_mini --eval --episodes 2000  # episodes split over ranks

The runtime is agentc/runtime: engine.py (a static KV cache of B rows, batched decoding, sampling,
the cached prefix), episode.py (the episode loop with the workflow's tools; one at a time, or B at a
time with continuous batching), constrain.py (tool calls that follow the tools' JSON schemas) and
evaluate.py (fresh tasks, summaries). This script is its command line.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed

from agentc.model.parallel import join_ranks
from agentc.model.transformer import BACKENDS, resolve_backend
from agentc.runtime import agent as agent_dir
from agentc.runtime.agent import Agent
from agentc.runtime.engine import DEFAULT_DRAFT, KV_DTYPES, MODES, BadLogits, Engine  # noqa: F401  (the runtime's names, for scripts)
from agentc.runtime.episode import EpisodeResult, cut_tokens, make_engine, play_episode, run_episode  # noqa: F401
from agentc.runtime.evaluate import combine, eval_tasks, evaluate, print_summary  # noqa: F401
from agentc.util import ArgumentParser, run_main, write_json
from agentc.workflows import sandbox

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
    ap.add_argument("--pass-k", type=int, default=1, metavar="K",
                    help="--eval: K sampled attempts at every task, reporting pass^1..pass^K (the share of tasks "
                         "that j attempts all solve); needs --temperature > 0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="auto", choices=BACKENDS, help="attention backend (auto: triton on CUDA, sdpa on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    ap.add_argument("--batch", type=int, default=16, help="episodes decoded together on one batched engine "
                    "(--eval; continuous batching); 1: one at a time")
    ap.add_argument("--workers", type=int, default=1, help="with --batch 1: episodes run in parallel processes "
                    "(--eval); on a CPU they share the threads")
    ap.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=True,
                    help="tool calls follow the tools' JSON schemas (a tool name from the allowlist, its "
                         "required keys, types and enums)")
    ap.add_argument("--quant", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                    help="weights for decoding (auto: int8 on a CPU, as loaded on CUDA); see agentc/model/quant.py")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="decode steps as compiled graphs (agentc/model/decode.py; a failure warns and runs eagerly)")
    ap.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES,
                    help="KV cache dtype (auto: bfloat16 for int8 and bf16 weights, else the model's)")
    ap.add_argument("--draft", type=int, default=DEFAULT_DRAFT,
                    help="prompt-lookup draft tokens verified per step (0: off); never changes a greedy output")
    ap.add_argument("--interleave", type=int, default=256,
                    help="with --batch: a longer observation is prefilled this many tokens at a time between "
                         "the other episodes' decode steps (0: in one go)")
    ap.add_argument("--out", default=None, help="summary JSON (default AGENT/eval_SPLIT_MODE.json)")
    ap.add_argument("--traces", default=None, help="one JSON line per episode (default AGENT/traces_SPLIT_MODE.jsonl)")
    ap.add_argument("--unsafe-sandbox", action="store_true",
                    help="run model-written code (the code workflow) even where no OS isolation works")
    args = ap.parse_args(argv)
    if args.unsafe_sandbox:
        sandbox.allow_unsafe()
    ap.check_ranges(args, at_least={"episodes": 1, "max_steps": 1, "max_new_tokens": 1, "max_len": 2,
                                    "observation_tokens": 1, "threads": 0, "workers": 1, "batch": 1,
                                    "draft": 0, "interleave": 0,
                                    "temperature": 0, "pass_k": 1},
                    positive=["tool_timeout"])
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
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: each rank runs its share of the episodes; rank 0 reports
        if not args.eval:
            ap.error("under torchrun infer.py evaluates (--eval); run --task in one process")
        args.device = join_ranks(args.device)
    if args.batch > 1 and args.workers > 1:
        ap.error("--workers runs one-row engines in processes: give --batch 1 with it")
    if args.batch > 1 and args.mode != "incremental":
        ap.error(f"--mode {args.mode} is a one-row baseline: give --batch 1 with it")
    if args.pass_k > 1 and args.temperature == 0:
        ap.error("--pass-k needs --temperature > 0: greedy attempts at one task are identical")
    if args.workflow == "all" and not args.eval:
        ap.error("--workflow all is for --eval; name one workflow for --task")
    try:
        names = agent_dir.workflow_names(args.agent) if args.workflow == "all" else [args.workflow]
        agents = [agent_dir.load(args.agent, args.device, name, args.attn) for name in names]
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: {e}") from None
    quant = args.quant if args.quant != "auto" else ("int8" if args.device == "cpu" else "as loaded")
    if quant != "as loaded":
        from agentc.model.quant import quantize
        for agent in agents:
            quantize(agent.model, quant)
    episode_kw = dict(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                      observation_tokens=args.observation_tokens, tool_timeout=args.tool_timeout)
    engine_kw = dict(max_len=args.max_len, mode=args.mode, temperature=args.temperature, top_p=args.top_p,
                     constrain=args.constrain, compile=args.compile, kv_dtype=args.kv_dtype, draft=args.draft,
                     interleave=args.interleave)
    if args.task is not None:
        agent = agents[0]
        engine = make_engine(agent, seed=args.seed, **engine_kw)
        r = stream_episode(agent, args.task, args.seed, args.split, engine, **episode_kw)
        print(f"\n[{r.ended}; {len(r.steps)} steps; {sum(s.latency_s for s in r.steps):.2f} s in the model]")
        return r
    per = {}
    for agent in agents:
        name = "" if len(agents) == 1 else f"_{agent.workflow.name}"
        base = os.path.join(agent.path, f"eval_{args.split}_{args.mode}{name}")
        if len(agents) > 1 and rank == 0:
            print(f"\n== {agent.workflow.name}")
        per[agent.workflow.name] = s = evaluate(agent, args.episodes, args.split, args.seed,
                                                traces=(len(agents) == 1 and args.traces) or
                                                base.replace("eval_", "traces_") + ".jsonl", workers=args.workers,
                                                batch=args.batch, engine_kw=engine_kw, episode_kw=episode_kw,
                                                repeats=args.pass_k, shard=(rank, world))
        s["mode"] = args.mode
        if rank == 0:
            print_summary(s)
    summary = per[agents[0].workflow.name] if len(agents) == 1 else combine(per)
    summary.update(agent=agents[0].path, mode=args.mode, device=args.device, torch=torch.__version__,
                   quant=quant, constrain=args.constrain, ranks=world,
                   attention=resolve_backend(args.attn, args.device), threads=torch.get_num_threads())
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return summary
    if len(agents) > 1:
        print_summary(summary)
    out = args.out or os.path.join(agents[0].path, f"eval_{args.split}_{args.mode}{'_all' * (len(agents) > 1)}.json")
    write_json(out, summary)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    run_main(main, "infer.py")
