"""Generate teacher trajectories for a workflow, as JSONL in the OpenAI chat format.

    python -m agentc.data.generate --workflow sql --split train --n 20000 --out data/sql/train.jsonl

Task i (0 <= i < n) is sampled from a seed derived from (--seed, workflow, split, i, attempt), so
the output depends only on the arguments, never on --workers. --shard i/n keeps the task indices
congruent to i mod n: n machines with the same --n and --seed produce disjoint parts of one set.

Only trajectories the checker accepts are written. A rejected attempt (wrong answer, teacher
error, a tool crash) is logged to OUT.rejects.jsonl and the task is retried with the next attempt
seed, up to --max-attempts; a task that fails every attempt is counted as lost. Output goes to
OUT.partial line by line and is renamed to OUT at the end; after a crash, --resume continues from
the last index written. A summary is printed and written to OUT.stats.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from agentc.util import ArgumentParser, ordered_map, parse_kv, progress_bar, read_json, read_jsonl, run_main, write_json
from agentc.workflows import sandbox
from agentc.workflows.base import SPLITS, Workflow, load_workflow, run_teacher, task_seed

_WF: Workflow | None = None  # one workflow object per worker process
_WF_SPEC: dict = {}  # how to build it again (the runtime must: test tasks depend on the split shares)


def _init_worker(name: str, kwargs: dict) -> None:
    global _WF, _WF_SPEC
    _WF = load_workflow(name, **kwargs)
    _WF_SPEC = {"module": name, "kwargs": kwargs}


def generate_one(job: tuple[int, int, int, str]) -> tuple[dict | None, list[dict]]:
    """Run task `index` until an attempt is accepted. Returns (record or None, rejects).
    A reject's "kind" is the episode's failure (agentc.workflows.base.Episode.failure)."""
    index, seed, max_attempts, split = job
    wf = _WF
    rejects = []
    for attempt in range(max_attempts):
        task = wf.sample_task(split, index, task_seed(seed, wf.name, split, index, attempt))
        ep = run_teacher(wf, task)
        kind = ep.failure
        if kind == "tool_crash":
            reason = next(o.text for o in ep.observations if o.kind == "crash")
        elif kind is not None:
            reason = ep.verdict.reason or "rejected by the checker"
        else:
            meta = {"workflow": wf.name, "workflow_module": _WF_SPEC["module"],
                    "workflow_kwargs": _WF_SPEC["kwargs"], "task_id": task.id, "split": split, "seed": task.seed,
                    "success": True, "index": index, "attempt": attempt, "family": task.family,
                    "heldout": task.heldout, "wording": task.wording,
                    "n_calls": sum(1 for m in ep.messages if m.get("tool_calls"))}
            return {"messages": ep.messages, "tools": ep.tools, "meta": meta}, rejects
        rejects.append({"task_id": task.id, "index": index, "attempt": attempt, "family": task.family,
                        "kind": kind, "reason": reason, "answer": ep.answer}
                       | ({"traceback": ep.error} if ep.error else {}))
    return None, rejects


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.data.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", required=True, help="workflow name (workflows/NAME.py) or a dotted module")
    ap.add_argument("--split", required=True, choices=SPLITS)
    ap.add_argument("--n", type=int, required=True, help="number of tasks (before sharding)")
    ap.add_argument("--out", required=True, help="output .jsonl file")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: generate only this part")
    ap.add_argument("--max-attempts", type=int, default=4, help="attempts per task before it counts as lost")
    ap.add_argument("--test-share", type=float, default=0.3, help="share of entity values and numbers held out for test")
    ap.add_argument("--heldout-template-share", type=float, default=0.25,
                    help="share of question templates per family that only the test split uses")
    ap.add_argument("--workflow-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a keyword argument of the workflow's constructor (repeatable; VALUE is JSON or a "
                         "plain string), e.g. --workflow-arg invented=0.8 for sql")
    ap.add_argument("--mistake-rate", type=float, default=0.0,
                    help="chance per teacher call of a deliberate mistake first (its error kept in context, "
                         "loss weight 0), where the workflow knows one")
    ap.add_argument("--fault-rate", type=float, default=0.0,
                    help="chance per call attempt of a transient tool error (timeout, rate limit, locked "
                         "database) that the teacher answers by retrying the same call")
    ap.add_argument("--resume", action="store_true", help="continue OUT.partial after a crash")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--unsafe-sandbox", action="store_true",
                    help="run the teachers' code (the code workflow) even where no OS isolation works")
    args = ap.parse_args(argv)
    if args.unsafe_sandbox:
        sandbox.allow_unsafe()
    ap.check_ranges(args, at_least={"n": 1, "max_attempts": 1, "workers": 1},
                    between={"test_share": (0, 1), "heldout_template_share": (0, 1), "mistake_rate": (0, 1),
                             "fault_rate": (0, 1)})
    wf_kwargs = {"test_share": args.test_share, "heldout_template_share": args.heldout_template_share}
    if args.mistake_rate:
        wf_kwargs["mistake_rate"] = args.mistake_rate
    if args.fault_rate:
        wf_kwargs["fault_rate"] = args.fault_rate
    for item in args.workflow_arg:
        try:
            key, value = parse_kv(item, "--workflow-arg")
        except ValueError as e:
            ap.error(str(e))
        wf_kwargs[key] = value
    try:
        wf = load_workflow(args.workflow, **wf_kwargs)  # fail here, not in a worker, on a bad name
    except TypeError as e:  # an argument the workflow's constructor does not take
        ap.error(f"workflow {args.workflow!r}: {e}")
    except (ValueError, ImportError) as e:  # no such workflow, or its module does not import
        raise ValueError(f"--workflow {args.workflow}: {e}") from None
    if os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a directory; give the .jsonl file to write")

    shard_i, shard_n = args.shard
    indices = list(range(shard_i, args.n, shard_n))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    partial, rejects_path, run_path = args.out + ".partial", args.out + ".rejects.jsonl", args.out + ".partial.run"
    # Everything that decides the output; a resumed run must match it exactly.
    run = {"workflow": args.workflow, "split": args.split, "n": args.n, "seed": args.seed,
           "shard": f"{shard_i}/{shard_n}", "max_attempts": args.max_attempts} | wf_kwargs
    kept, rejects = [], []
    if args.resume and os.path.exists(partial):
        saved = None
        if os.path.exists(run_path):
            saved = read_json(run_path)
        if saved != run:
            raise SystemExit(f"error: {partial} was made by a different run ({saved}); these arguments "
                             f"give {run}: rerun with the original arguments, or without --resume")
        kept, rejects = read_jsonl(partial), (read_jsonl(rejects_path) if os.path.exists(rejects_path) else [])
        # Continue after the last kept record; rejects of later tasks are redone (same seeds, same result).
        done = max((r["meta"]["index"] for r in kept), default=-1)
        indices = [i for i in indices if i > done]
        rejects = [r for r in rejects if r["index"] <= done]
        print(f"resuming {partial}: {len(kept)} trajectories kept so far, continuing after index {done}")
    elif os.path.exists(partial):
        print(f"note: overwriting an earlier {partial} (pass --resume to continue it)", file=sys.stderr)
    if not args.resume:  # an earlier output must not pass for this run's if this one is killed
        for path in (args.out, args.out + ".stats.json"):
            if os.path.exists(path):
                os.remove(path)
    write_json(run_path, run)
    # Rewrite the partial files from what was read, so a torn last line is dropped.
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    with open(rejects_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)

    n_kept, n_rej = len(kept), len(rejects)
    n_kept_before = n_kept
    calls = sum(r["meta"]["n_calls"] for r in kept)
    families = Counter(r["meta"]["family"] for r in kept)
    wordings: dict[str, set] = {}   # family -> distinct prompt skeletons (workflows/phrasing.py)
    heldout = Counter(r["meta"].get("heldout", "seen") for r in kept)
    for r in kept:
        wordings.setdefault(r["meta"]["family"], set()).add(r["meta"].get("wording", ""))
    jobs = [(i, args.seed, args.max_attempts, args.split) for i in indices]
    t0 = time.time()
    bar = progress_bar(len(jobs), f"{wf.name}/{args.split}", "task", disable=args.quiet, smoothing=0.05)
    # ordered results: the output does not depend on --workers
    with open(partial, "a", encoding="utf-8") as out, open(rejects_path, "a", encoding="utf-8") as rej, \
            ordered_map(generate_one, jobs, args.workers, _init_worker, (args.workflow, wf_kwargs), 8) as results:
        try:
            for record, task_rejects in results:
                for r in task_rejects:
                    rej.write(json.dumps(r, ensure_ascii=False) + "\n")
                n_rej += len(task_rejects)
                if record is not None:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n_kept += 1
                    calls += record["meta"]["n_calls"]
                    families[record["meta"]["family"]] += 1
                    wordings.setdefault(record["meta"]["family"], set()).add(record["meta"]["wording"])
                    heldout[record["meta"]["heldout"]] += 1
                out.flush()
                rej.flush()
                bar.set_postfix(kept=n_kept, rejected=n_rej, refresh=False)  # before update(): its line shows them
                bar.update(1)
        finally:
            bar.close()
    elapsed = time.time() - t0
    all_rejects = read_jsonl(rejects_path)
    lost = len(range(shard_i, args.n, shard_n)) - n_kept  # every task was tried: kept or lost
    stats = {"workflow": wf.name, "split": args.split, "n": args.n, "shard": f"{shard_i}/{shard_n}",
             "seed": args.seed, "kept": n_kept, "rejected_attempts": n_rej, "lost_tasks": lost,
             "reject_kinds": dict(Counter(r["kind"] for r in all_rejects)),
             "mean_calls": calls / max(n_kept, 1), "families": dict(sorted(families.items())),
             "distinct_wordings": {f: len(w) for f, w in sorted(wordings.items())}, "wordings": dict(heldout),
             "seconds": round(elapsed, 2), "tasks_per_s": round(len(jobs) / max(elapsed, 1e-9), 1),
             "kept_per_s": round((n_kept - n_kept_before) / max(elapsed, 1e-9), 1),
             "workers": args.workers, "test_share": args.test_share,
             "heldout_template_share": args.heldout_template_share}
    write_json(args.out + ".stats.json", stats)
    os.replace(partial, args.out)  # last: OUT exists only complete, with its stats
    os.remove(run_path)
    print(f"wrote {args.out}: {n_kept} trajectories kept, {n_rej} rejected attempts"
          f"{' ' + str(stats['reject_kinds']) if n_rej else ''}, {lost} tasks lost; "
          f"{stats['kept_per_s']} trajectories/s with {args.workers} workers; "
          f"{stats['mean_calls']:.1f} tool calls per trajectory; "
          f"{sum(stats['distinct_wordings'].values())} distinct wordings over {len(families)} families")
    if n_rej:
        print(f"rejected attempts are listed in {rejects_path}")
    bugs = [r for r in all_rejects if r["kind"] in ("teacher_error", "tool_crash")]
    if bugs:
        first = bugs[0]
        print(f"warning: {len(bugs)} attempts failed on a bug in the workflow's teacher or tools; the first "
              f"({first['task_id']}): {first['reason']}\n{first.get('traceback', '')}", file=sys.stderr)
    if not n_kept:
        raise SystemExit(f"error: no trajectory was accepted; see {rejects_path}")
    return stats


if __name__ == "__main__":
    run_main(main, "agentc.data.generate")
