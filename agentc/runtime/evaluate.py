"""Evaluation: a compiled agent on fresh tasks, with the workflow's real tools and checker.

    summary = evaluate(agent, episodes=200, split="test", batch=16, traces="traces.jsonl")
    print_summary(summary)

Episodes run through the runtime (agentc/runtime/episode.py): `batch` of them at a time on one
batched engine (continuous batching, the default of infer.py --eval), or one at a time on a
one-row engine in each of `workers` processes. Every episode is the same either way, its sampling
seed included (in float32 greedy decoding its tokens are identical; tests/test_batch.py).

Tasks are fresh: seed 1 by default, while agentc.data.generate makes training data with seed 0.
A summary holds the success rate, the first failure of every episode by kind, the errors the
agent's calls met, latency, prefill and decode counts, throughput, and success by question family
and by wording (seen in training, or a held-out template or combination; workflows/phrasing.py),
each with a 95% Wilson interval. `repeats=k` runs every task k times with other sampling seeds
and reports pass^k, the share of tasks all k attempts solve. A mixture agent is evaluated per
workflow and the summaries combined (combine).

Under torchrun (`shard=(rank, world)`), rank r runs episodes r, r + world, ... and the results
are gathered, so every rank returns the summary one process would (its timings aside) and rank 0
writes the traces in task order.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from typing import Callable

import torch

from agentc.runtime import agent as agent_dir
from agentc.runtime.episode import FAILURE_KINDS, EpisodeResult, make_engine, play_episode, run_batch
from agentc.util import ordered_map, progress_bar
from agentc.workflows.base import Workflow, task_seed


def eval_tasks(workflow: Workflow, split: str, n: int, seed: int, attempt: int = 0) -> list:
    """n tasks of `split`; with seed 1 (the default everywhere) none is a task of the training data.
    Another `attempt` of the same seed draws other tasks (agentc/runtime/onpolicy.py's rounds)."""
    return [workflow.sample_task(split, i, task_seed(seed, workflow.name, split, i, attempt)) for i in range(n)]


# ----------------------------------------------------------------------------- running episodes

_WORKER: tuple | None = None  # (agent, play) in a worker process


def _init_worker(path: str, device: str, workflow: str, attention: str, threads: int, play: Callable,
                 quant: str | None = None) -> None:
    global _WORKER
    if threads:
        torch.set_num_threads(threads)
    agent = agent_dir.load(path, device, workflow, attention)
    if quant:  # the weights the parent runs (agentc/model/quant.py)
        from agentc.model.quant import quantize
        quantize(agent.model, quant)
    _WORKER = (agent, play)


def _worker_episode(job):
    agent, play = _WORKER
    task, i = job
    return play(agent, task, i)


def evaluate(agent: agent_dir.Agent, episodes: int = 200, split: str = "test", seed: int = 1,
             traces: str | None = None, progress: bool = True, workers: int = 1, batch: int = 1,
             engine_kw: dict | None = None, episode_kw: dict | None = None, repeats: int = 1,
             shard: tuple[int, int] = (0, 1)) -> dict:
    """Run `episodes` fresh tasks of `split`; write one trace line per episode (in task order) to
    `traces`; return the summary. batch > 1: that many episodes at a time on one batched engine.
    workers > 1 (with batch 1): episodes in that many processes, each loading the agent from
    agent.path (on a CPU they share torch's threads). engine_kw: Engine's options (and
    `constrain`), episode_kw: the episode's (agentc/runtime/episode.py). repeats: attempts per task;
    attempt r of task i is episode i + r * episodes, which fixes its sampling seed. shard=(rank,
    world): this rank's share of the episodes, gathered over the default process group."""
    import functools
    if batch > 1 and workers > 1:
        raise ValueError("run a batched engine in one process: give batch > 1 or workers > 1, not both")
    engine_kw, episode_kw = dict(engine_kw or {}), dict(episode_kw or {})
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard (rank {rank}, world {world}) is not a rank of the world")
    tasks = eval_tasks(agent.workflow, split, episodes, seed) * repeats
    jobs = [(task, i) for i, task in enumerate(tasks)][rank::world]  # strided: each rank gets easy and hard
    play = functools.partial(play_episode, seed=seed, engine_kw=engine_kw, episode_kw=episode_kw)
    if not jobs:  # more ranks than episodes
        pool = contextlib.nullcontext(iter(()))
    elif batch > 1:
        engine = make_engine(agent, rows=min(batch, len(jobs)), **engine_kw)
        pool = _unordered(run_batch(agent, jobs, engine, seed, **episode_kw), [i for _, i in jobs])
    elif workers > 1:
        if not agent.path:
            raise ValueError("workers > 1 needs an agent loaded from a directory (each worker loads it)")
        device = str(next(agent.model.parameters()).device)
        threads = max(1, torch.get_num_threads() // workers) if device == "cpu" else 0
        pool = ordered_map(_worker_episode, jobs, workers, _init_worker,
                           (agent.path, device, agent.workflow.name, agent.model.cfg.attention, threads, play,
                            getattr(agent.model, "quant_kind", None)),
                           start="spawn")  # spawn: no inherited torch threads or CUDA context
    else:
        pool = ordered_map(lambda job: play(agent, *job), jobs)
    results = []
    own_traces = traces and (f"{traces}.rank{rank}" if world > 1 else traces)  # streamed: a crash keeps them
    trace_file = open(own_traces, "w") if traces else None
    bar = progress_bar(len(jobs), f"eval {agent.workflow.name} {split}", "ep", disable=not progress or rank > 0)
    t0 = time.perf_counter()
    try:
        with pool as stream:
            for (_, i), r in zip(jobs, stream):
                r.repeat = i // episodes
                results.append((i, r))
                bar.update()
                if trace_file:
                    trace_file.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
                    trace_file.flush()
    finally:
        bar.close()
        if trace_file:
            trace_file.close()
    if world > 1:
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, results)
        results = sorted((x for part in parts for x in part), key=lambda x: x[0])
        if traces and rank == 0:
            with open(traces, "w") as f:
                f.writelines(json.dumps(asdict(r), ensure_ascii=False) + "\n" for _, r in results)
        dist.barrier()  # every rank's part is in the merged file before it goes
        if traces:
            os.remove(own_traces)
    results = [r for _, r in results]
    wall = time.perf_counter() - t0
    summary = summarize(results, split, seed, repeats)
    summary.update(workers=max(1, workers), batch=max(1, batch), wall_s=wall,
                   episodes_per_min=60 * len(results) / max(1e-9, wall),
                   decode_tokens_per_s_wall=summary["decode_tokens"] / max(1e-9, wall))
    return summary


@contextlib.contextmanager
def _unordered(stream, order: list[int]):
    """(index, result) pairs as episodes finish -> results in the order of the indices `order`,
    each as soon as every earlier one is in (so a trace file is in task order and nothing finished
    waits long)."""
    def ordered():
        held, k = {}, 0
        for i, r in stream:
            held[i] = r
            while k < len(order) and order[k] in held:
                yield held.pop(order[k])
                k += 1
    gen = ordered()
    try:
        yield gen
    finally:
        gen.close()
        stream.close()


# ----------------------------------------------------------------------------- summaries


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a success rate: honest at 0/n and n/n, unlike p +- 2 sd."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))]


def rate(results: list, keep=lambda r: True) -> dict:
    """{"rate", "successes", "n", "ci95"} of the results `keep` selects."""
    sel = [r for r in results if keep(r)]
    k = sum(r.success for r in sel)
    return {"rate": k / max(1, len(sel)), "successes": k, "n": len(sel), "ci95": wilson(k, len(sel))}


def pass_k(results: list, repeats: int) -> dict:
    """pass^j for j = 1..repeats (tau-bench's reliability measure): the chance that j attempts at a
    task, drawn without replacement from its `repeats`, all succeed, averaged over tasks."""
    by_task: dict[str, list[bool]] = {}
    for r in results:
        by_task.setdefault(r.task_id, []).append(r.success)
    out = {}
    for j in range(1, repeats + 1):
        out[f"pass^{j}"] = sum(math.comb(sum(s), j) / math.comb(len(s), j) for s in by_task.values()) / len(by_task)
    return out


def summarize(results: list[EpisodeResult], split: str, seed: int, repeats: int = 1) -> dict:
    n = len(results)
    latencies = [s.latency_s for r in results for s in r.steps]
    tot = {k: sum(r.stats[k] for r in results) for k in results[0].stats} if results else {}
    call_errors = {}
    for r in results:
        for s in r.steps:
            if s.observation_kind not in (None, "ok"):
                call_errors[s.observation_kind] = call_errors.get(s.observation_kind, 0) + 1
    return {
        "episodes": n, "split": split, "seed": seed,
        "success_rate": sum(r.success for r in results) / max(1, n),
        "failures": {k: sum(r.failure == k for r in results) for k in FAILURE_KINDS},
        "errors_in_calls": call_errors,
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
        # {rate, successes, n, ci95} overall, per question family, and per wording: seen in
        # training, or a template / (template, register) combination it never saw (phrasing.py)
        "success": rate(results),
        "by_family": {f: rate(results, lambda r: r.family == f) for f in sorted({r.family for r in results})},
        "by_wording": {k: rate(results, lambda r: r.heldout == k) for k in ("seen", "combination", "template")},
    } | ({"repeats": repeats, **pass_k(results, repeats)} if repeats > 1 else {})


def combine(per: dict[str, dict]) -> dict:
    """One summary of several workflows' summaries (a mixture agent): each under `workflows`, the
    success rate as the mean over workflows (each counts the same, whatever its episodes), failures
    summed, steps averaged over all episodes."""
    n = sum(s["episodes"] for s in per.values())
    rates = {name: s["success_rate"] for name, s in per.items()}
    return {"workflows": per, "success_rate_by_workflow": rates, "success_rate": sum(rates.values()) / len(rates),
            "episodes": n, "failures": {k: sum(s["failures"][k] for s in per.values()) for k in FAILURE_KINDS},
            "mean_steps": sum(s["mean_steps"] * s["episodes"] for s in per.values()) / max(1, n)}


def print_summary(s: dict) -> None:
    if "workflows" in s:
        print(f"\n{'workflow':<12} {'success':>8}  episodes")
        for name, w in s["workflows"].items():
            print(f"{name:<12} {100 * w['success_rate']:>7.1f}%  {w['episodes']}")
        print(f"{'mean':<12} {100 * s['success_rate']:>7.1f}%")
        return
    mode = f" ({s['mode']})" if s.get("mode") else ""
    print(f"\n{s['episodes']} {s['split']} episodes{mode}: success {100 * s['success_rate']:.1f}%")
    rows = [("failures", ", ".join(f"{k} {v}" for k, v in s["failures"].items())),
            ("errors seen in calls", ", ".join(f"{k} {v}" for k, v in s["errors_in_calls"].items()) or "none"),
            ("mean steps", f"{s['mean_steps']:.2f}"),
            ("latency per step", f"mean {1e3 * s['mean_step_latency_s']:.1f} ms, "
                                 f"p95 {1e3 * s['p95_step_latency_s']:.1f} ms"),
            ("prefill tokens", f"{s['prefill_tokens']:,} (re-encoding would run {s['prefill_tokens_if_reencoded']:,}: "
                               f"{s['prefill_tokens_saved']:,} saved)"),
            ("decode", f"{s['decode_tokens']:,} tokens, {s['decode_tokens_per_s']:.0f} tokens/s per episode")]
    if "episodes_per_min" in s:
        rows.append(("throughput", f"{s['episodes_per_min']:.0f} episodes/min, {s['decode_tokens_per_s_wall']:.0f} "
                                   f"tokens/s decoded (batch {s['batch']}, {s['workers']} process(es))"))
    def cell(r: dict) -> str:
        return f"{r['successes']}/{r['n']} ({100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}%)"
    rows.append(("success, 95% interval", cell(s["success"])))
    if s["by_wording"]["template"]["n"] or s["by_wording"]["combination"]["n"]:
        rows.append(("by wording", ", ".join(f"{k} {cell(r)}" for k, r in s["by_wording"].items() if r["n"])))
    if len(s.get("by_family", {})) > 1:
        rows.append(("by family", ", ".join(f"{f} {r['successes']}/{r['n']}" for f, r in s["by_family"].items())))
    if "repeats" in s:
        rows.append((f"pass^k ({s['repeats']} attempts)", ", ".join(f"{k} {100 * s[k]:.1f}%" for k in s
                                                                   if k.startswith("pass^"))))
    for k, v in rows:
        print(f"  {k:<22} {v}")
