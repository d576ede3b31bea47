"""On-policy data: the compiled agent plays train tasks, and the teacher labels what it did.

    python -m agentc.runtime.onpolicy --agent out/sql_mini --episodes 2000 --out data/sql/round1.jsonl
    python -m agentc.runtime.onpolicy --agent out/sql_mini --episodes 2000 --temperature 0.7 --round 2 \
        --out data/sql/round2.jsonl

The agent plays `--episodes` train tasks through the batched runtime (as evaluation does, greedy or at
`--temperature`; fresh tasks: seed 2, where the teacher's data uses 0 and evaluation 1, and other
tasks in each `--round`). Then:

  dagger   an episode that failed: the teacher takes over where it first left the teacher's plan
           (agentc/workflows/takeover.py). The record keeps the agent's own steps as context with
           loss weight 0 (the step that went wrong too, when the state after it can still be
           continued: the continuation then teaches the recovery) and trains the teacher's
           continuation, which the checker must accept.
  expert   an episode the checker accepted, kept as the agent played it (expert iteration); its
           calls that met an error are kept as weight-0 context.

`--sources` picks which are kept. Every record carries its provenance in meta: source, agent,
round, temperature, the step of the takeover, why the agent left the plan. A state the teacher
cannot continue, a takeover that raises or that the checker rejects, an episode whose transcript
cannot be rendered: each is counted by reason in OUT.stats.json and skipped; nothing stops the
collection. Also in the stats: success on the train tasks by family (the curriculum's signal),
where episodes left the plan, and the CPU seconds of playing and of labelling.

The next round's training mixture is made by agentc/data/mix.py from these records, the teacher's
and, for the family curriculum, OUT.stats.json.

Output goes to OUT.partial in episode order, with one line per episode in OUT.episodes.jsonl (its
outcome and the agent's transcript);
after `kill -9`, --resume continues after the last episode written, and the result is the same
bytes (in float32 weights, the default here, decoding does not depend on the batch). Under
torchrun each rank plays episodes rank, rank + world, ... and rank 0 writes OUT.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import torch

from agentc.runtime import agent as agent_dir
from agentc.runtime.evaluate import _unordered, eval_tasks
from agentc.util import ArgumentParser, progress_bar, read_json, read_jsonl, run_main, write_json
from agentc.workflows import sandbox
from agentc.workflows.takeover import Unrecoverable, agent_steps, first_departure, take_over, teacher_plan

SOURCES = ("dagger", "expert")
COLLECT_SEED = 2  # teacher data uses seed 0, evaluation seed 1


def collect_tasks(workflow, n: int, seed: int, round_: int = 1, split: str = "train") -> list:
    """n train tasks, fresh for each round: round r draws task i with attempt r - 1 of the seed, so
    a round never replays the tasks an earlier round's records were made from."""
    return eval_tasks(workflow, split, n, seed, attempt=round_ - 1)


def _meta(agent, task, source: str, provenance: dict, messages: list[dict]) -> dict:
    wf = agent.workflow
    entry = next((w for w in agent.meta.get("workflows") or [] if w["name"] == wf.name), {})
    return {"workflow": wf.name, "workflow_module": entry.get("module", wf.name),
            "workflow_kwargs": entry.get("kwargs", {}), "task_id": task.id, "split": task.split, "seed": task.seed,
            "success": True, "index": provenance["index"], "family": task.family, "heldout": task.heldout,
            "wording": task.wording, "n_calls": sum(1 for m in messages if m.get("tool_calls")),
            "source": source} | provenance


def _head(agent, task) -> tuple[list[dict], list[dict]]:
    """The system and user messages of a record, and the tools list, as the teacher's data has them."""
    wf = agent.workflow
    env = wf.make_env(task)
    try:
        return ([{"role": "system", "content": wf.system_prompt(env)}, {"role": "user", "content": task.prompt}],
                [t.schema() for t in env.tools()])
    finally:
        env.close()


def label(agent, task, result, provenance: dict, sources: tuple[str, ...]) -> tuple[dict | None, dict]:
    """(record or None, this episode's log line) for one played episode."""
    wf = agent.workflow
    steps = agent_steps(result.messages)
    log = {"index": provenance["index"], "task_id": task.id, "family": task.family, "success": result.success,
           "failure": result.failure, "steps": len(steps), "messages": result.messages}
    head, tools = _head(agent, task)
    if result.success:
        if "expert" not in sources:
            return None, log | {"outcome": "skipped", "reason": "expert_not_kept"}
        if any("invalid_call" in s["message"] for s in steps):
            return None, log | {"outcome": "skipped", "reason": "invalid_call_in_episode"}
        body = []
        for k, s in enumerate(steps):
            msg = dict(s["message"])
            kind = result.steps[k].observation_kind if k < len(result.steps) else None
            if kind not in (None, "ok"):
                msg["weight"] = 0   # a call that met an error stays as context, untrained
            body += [msg] + ([s["result"]] if s["result"] is not None else [])
        messages = head + body
        return ({"messages": messages, "tools": tools,
                 "meta": _meta(agent, task, "expert", provenance | {"agent_steps": len(steps)}, messages)},
                log | {"outcome": "expert"})
    if "dagger" not in sources:
        return None, log | {"outcome": "skipped", "reason": "dagger_not_kept"}
    plan = teacher_plan(wf, task)
    if not plan.verdict.ok:
        return None, log | {"outcome": "skipped", "reason": "teacher_failed"}
    dep = first_departure(wf, task, steps, plan, result.success)
    log |= {"departure": dep.step, "why": dep.why}
    cuts = []  # keep the step that went wrong when it is a call whose state can be continued
    if dep.step < len(steps) and steps[dep.step]["call"] is not None and dep.state_ok:
        cuts.append(dep.step + 1)
    cuts.append(dep.step)
    reason = ""
    for cut in cuts:
        calls = [s["call"] for s in steps[:cut]]
        try:
            cont = take_over(wf, task, calls, plan)
        except Unrecoverable as e:
            reason = e.reason
            continue
        if not cont.verdict.ok:
            reason = "takeover_rejected"
            continue
        body = []
        for s in steps[:cut]:
            body += [dict(s["message"], weight=0)] + ([s["result"]] if s["result"] is not None else [])
        messages = head + body + cont.messages
        prov = provenance | {"takeover_step": cut, "departure": dep.step, "why": dep.why, "agent_steps": len(steps),
                             "teacher_calls": cont.sent, "reused_calls": cont.reused}
        return ({"messages": messages, "tools": tools, "meta": _meta(agent, task, "dagger", prov, messages)},
                log | {"outcome": "dagger", "takeover_step": cut})
    return None, log | {"outcome": "skipped", "reason": reason}


def _label_safely(agent, task, result, provenance, sources):
    try:
        return label(agent, task, result, provenance, sources)
    except Exception as e:  # a takeover or a tool that raised: counted, never fatal
        return None, {"index": provenance["index"], "task_id": task.id, "family": task.family,
                      "success": result.success, "failure": result.failure, "outcome": "skipped",
                      "reason": f"error:{type(e).__name__}", "error": str(e)[:500]}


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.runtime.onpolicy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", required=True, help="a compiled agent: train.py's --out directory or a checkpoint")
    ap.add_argument("--out", required=True, help="output .jsonl (the round's records)")
    ap.add_argument("--episodes", type=int, required=True, help="episodes to play (train tasks 0..N-1)")
    ap.add_argument("--workflow", default=None, help="which of the agent's workflows (default: its first)")
    ap.add_argument("--split", default="train", choices=["train"],
                    help="only train: test tasks are for the final evaluation")
    ap.add_argument("--seed", type=int, default=COLLECT_SEED, help=f"task seed (default {COLLECT_SEED})")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--round", type=int, default=1,
                    help="the round (from 1): each round plays other tasks; recorded in each record's meta")
    ap.add_argument("--sources", default="dagger,expert", help="which records to keep: dagger, expert or both")
    ap.add_argument("--batch", type=int, default=16, help="episodes at a time on one batched engine")
    ap.add_argument("--quant", default="fp32", choices=("fp32", "bf16", "int8"),
                    help="decoding weights (fp32: the same episodes whatever the batch, so --resume is exact)")
    ap.add_argument("--max-steps", type=int, default=16, help="steps per episode, as in evaluation")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model turn, as in evaluation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resume", action="store_true", help="continue OUT.partial after a crash")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--unsafe-sandbox", action="store_true",
                    help="run model-written code (the code workflow) even where no OS isolation works")
    args = ap.parse_args(argv)
    ap.check_ranges(args, at_least={"episodes": 1, "round": 1, "batch": 1, "max_steps": 1, "max_new_tokens": 1,
                                    "threads": 0}, between={"temperature": (0, 10)})
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    if not sources or set(sources) - set(SOURCES):
        ap.error(f"--sources {args.sources}: give dagger, expert or dagger,expert")
    if os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a directory; give the .jsonl file to write")
    if args.unsafe_sandbox:
        sandbox.allow_unsafe()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        names = agent_dir.workflow_names(args.agent)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --agent {args.agent}: {e}") from None
    if args.workflow and args.workflow not in names:
        raise SystemExit(f"error: --agent {args.agent} was compiled for the workflows {names}, not --workflow "
                         f"{args.workflow}")
    agent = agent_dir.load(args.agent, "cpu", args.workflow)
    if args.quant != "fp32":
        from agentc.model.quant import quantize
        quantize(agent.model, args.quant)

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from agentc.model.parallel import join_ranks
        join_ranks("cpu")
    own = f"{args.out}.rank{rank}" if world > 1 else args.out
    partial, episodes_path, run_path = own + ".partial", own + ".episodes.jsonl.partial", own + ".partial.run"
    run = {"agent": agent_dir.resolve(args.agent), "workflow": agent.workflow.name, "episodes": args.episodes,
           "seed": args.seed, "temperature": args.temperature, "round": args.round, "sources": list(sources),
           "quant": args.quant, "max_steps": args.max_steps, "max_new_tokens": args.max_new_tokens, "world": world}
    records, logs = [], []
    if args.resume and os.path.exists(partial):
        saved = read_json(run_path) if os.path.exists(run_path) else None
        if saved != run:
            raise SystemExit(f"error: {partial} was made by a different run ({saved}); these arguments give "
                             f"{run}: rerun with the original arguments, or without --resume")
        logs = read_jsonl(episodes_path) if os.path.exists(episodes_path) else []
        records = read_jsonl(partial)
        done = max((r["index"] for r in logs), default=-1)
        records = [r for r in records if r["meta"]["index"] <= done]
        print(f"resuming {partial}: {len(logs)} episodes played, {len(records)} records kept")
    else:
        done = -1
        for path in (args.out, args.out + ".stats.json", args.out + ".episodes.jsonl"):
            if os.path.exists(path) and rank == 0:
                os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(run_path, run)
    for path, rows in ((partial, records), (episodes_path, logs)):  # drop a torn last line
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    tasks = collect_tasks(agent.workflow, args.episodes, args.seed, args.round)
    jobs = [(tasks[i], i) for i in range(rank, args.episodes, world) if i > done]
    from agentc.runtime.episode import make_engine, run_batch
    provenance = {"agent": run["agent"], "round": args.round, "temperature": args.temperature}
    t0, label_s = time.perf_counter(), 0.0
    bar = progress_bar(len(jobs), f"on-policy {agent.workflow.name}", "ep", disable=args.quiet or rank > 0)
    with open(partial, "a", encoding="utf-8") as out, open(episodes_path, "a", encoding="utf-8") as eplog:
        if jobs:
            engine = make_engine(agent, rows=min(args.batch, len(jobs)), temperature=args.temperature)
            stream = run_batch(agent, jobs, engine, args.seed, max_steps=args.max_steps,
                               max_new_tokens=args.max_new_tokens)
            with _unordered(stream, [i for _, i in jobs]) as results:
                for (task, i), result in zip(jobs, results):
                    t1 = time.perf_counter()
                    record, log = _label_safely(agent, task, result, provenance | {"index": i}, sources)
                    label_s += time.perf_counter() - t1
                    if record is not None:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                        records.append(record)
                    eplog.write(json.dumps(log, ensure_ascii=False) + "\n")
                    logs.append(log)
                    out.flush()
                    eplog.flush()
                    bar.set_postfix(kept=len(records), refresh=False)
                    bar.update()
    bar.close()
    seconds = {"play": time.perf_counter() - t0 - label_s, "label": label_s}
    if world > 1:
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, (records, logs, seconds))
        records = sorted((r for p in parts for r in p[0]), key=lambda r: r["meta"]["index"])
        logs = sorted((r for p in parts for r in p[1]), key=lambda r: r["index"])
        seconds = {k: sum(p[2][k] for p in parts) for k in seconds}
        dist.barrier()
        dist.destroy_process_group()
        if rank > 0:  # rank 0 writes OUT from every rank's part
            for path in (partial, episodes_path, run_path):
                os.remove(path)
            return {}
    final = own + ".final"
    with open(final, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(args.out + ".episodes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in logs)
    stats = summarize(logs, records) | {"seconds": {k: round(v, 1) for k, v in seconds.items()}, "run": run}
    write_json(args.out + ".stats.json", stats)
    os.replace(final, args.out)  # last: OUT exists only complete
    for path in (partial, episodes_path, run_path):
        if os.path.exists(path):
            os.remove(path)
    print(f"wrote {args.out}: {len(logs)} episodes ({100 * stats['success_rate']:.1f}% solved), "
          f"{stats['records']['dagger']} dagger and {stats['records']['expert']} expert records; "
          f"skipped {sum(stats['skipped'].values())} {dict(stats['skipped']) or ''}; "
          f"{seconds['play']:.0f} s playing, {seconds['label']:.0f} s labelling")
    return stats


def summarize(logs: list[dict], records: list[dict]) -> dict:
    fam = {}
    for r in logs:
        n, k = fam.get(r["family"], (0, 0))
        fam[r["family"]] = (n + 1, k + bool(r["success"]))
    return {"episodes": len(logs), "success_rate": sum(r["success"] for r in logs) / max(1, len(logs)),
            "by_family": {f: {"n": n, "successes": k, "rate": k / n} for f, (n, k) in sorted(fam.items())},
            "records": {s: sum(r["meta"]["source"] == s for r in records) for s in SOURCES},
            "skipped": dict(Counter(r["reason"] for r in logs if r["outcome"] == "skipped")),
            "departures": dict(Counter(r["why"] for r in logs if r.get("why"))),
            "failures": dict(Counter(r["failure"] for r in logs if r["failure"]))}


if __name__ == "__main__":
    run_main(main, "agentc.runtime.onpolicy")
