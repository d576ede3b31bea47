"""A round's training mixture: on-policy records and a draw of the teacher's.

    python -m agentc.data.mix --out data/sql/r1_mix.jsonl --teacher data/sql/train.jsonl --teacher-n 4000 \\
        --onpolicy data/sql/r1.jsonl --sources dagger,expert --curriculum data/sql/r1.jsonl.stats.json

Keeps the records of each --onpolicy file whose meta.source is in --sources (agentc/runtime/onpolicy.py
writes dagger and expert records), then draws --teacher-n records of the --teacher files (one per
workflow of a mixture, or one for all) without replacement.
The draw is uniform, or, with --curriculum (an onpolicy OUT.stats.json, repeatable: one per
workflow of a mixture), weighted per workflow/family by 0.1 + the agent's failure rate on that
family's train tasks in the collection, so the next round sees more of what the agent gets wrong
(a family the stats do not name weighs 1.1, as a family the agent always fails would). The output
depends only on the arguments. Counts by source and family go to OUT.stats.json.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from agentc.util import ArgumentParser, read_json, run_main, write_json
from agentc.workflows.base import stable_hash

FLOOR = 0.1  # a family the agent never fails still gets this weight


def curriculum_weights(stats: list[dict]) -> dict[str, float]:
    """workflow/family -> FLOOR + the failure rate, from agentc.runtime.onpolicy stats."""
    out = {}
    for s in stats:
        wf = s.get("run", {}).get("workflow")
        for family, r in (s.get("by_family") or {}).items():
            out[f"{wf}/{family}"] = FLOOR + 1 - r["rate"]
    return out


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]


def _key(line: str, where: str) -> str:
    try:
        meta = json.loads(line).get("meta") or {}
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{where}: not a JSON record") from None
    return f"{meta.get('workflow')}/{meta.get('family')}"


def draw(lines: list[str], n: int, weights: dict[str, float] | None, seed: int, where: str) -> list[str]:
    """n of `lines` without replacement, each with weight weights[workflow/family] (1 + FLOOR for a
    key it lacks; all equal without weights), in file order. Efraimidis-Spirakis keys u^(1/w) from a
    stable hash of the line number: the draw depends only on the arguments."""
    keyed = []
    for i, line in enumerate(lines):
        w = weights.get(_key(line, f"{where}:{i + 1}"), 1 + FLOOR) if weights else 1.0
        u = (stable_hash("teacher-mix", seed, i) % (1 << 53) + 1) / ((1 << 53) + 2)
        keyed.append((u ** (1.0 / w), i))
    return [lines[i] for i in sorted(i for _, i in sorted(keyed, reverse=True)[:n])]


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.data.mix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the mixture .jsonl to write")
    ap.add_argument("--teacher", action="append", required=True,
                    help="teacher trajectories (agentc.data.generate's output; repeatable: one file per workflow)")
    ap.add_argument("--teacher-n", type=int, required=True, help="teacher records to draw (0: none)")
    ap.add_argument("--onpolicy", action="append", default=[], help="an agentc.runtime.onpolicy output (repeatable)")
    ap.add_argument("--sources", default="dagger,expert", help="on-policy sources to keep: dagger, expert or both")
    ap.add_argument("--curriculum", action="append", default=[], metavar="STATS",
                    help="an agentc.runtime.onpolicy OUT.stats.json: draw the teacher's records by its failure rates")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher draw")
    args = ap.parse_args(argv)
    ap.check_ranges(args, at_least={"teacher_n": 0})
    sources = {s.strip() for s in args.sources.split(",") if s.strip()}
    if not sources <= {"dagger", "expert"}:
        ap.error(f"--sources {args.sources}: give dagger, expert or dagger,expert")
    for flag, paths in (("--teacher", args.teacher), ("--onpolicy", args.onpolicy), ("--curriculum", args.curriculum)):
        for p in paths:
            if not os.path.isfile(p):
                ap.error(f"{flag} {p}: no such file")
    stats = []
    for p in args.curriculum:
        try:
            s = read_json(p)
        except ValueError as e:
            ap.error(f"--curriculum {p}: {e}")
        if "by_family" not in s:
            ap.error(f"--curriculum {p}: not the stats of agentc.runtime.onpolicy (no by_family)")
        stats.append(s)
    weights = curriculum_weights(stats) if stats else None
    kept = []
    for p in args.onpolicy:
        for i, line in enumerate(_lines(p)):
            try:
                source = (json.loads(line).get("meta") or {}).get("source")
            except json.JSONDecodeError:
                raise SystemExit(f"error: {p}:{i + 1}: not valid JSON") from None
            if source in sources:
                kept.append(line)
    teacher = [line for p in args.teacher for line in _lines(p)]
    where = " + ".join(args.teacher)
    if args.teacher_n > len(teacher):
        ap.error(f"--teacher-n {args.teacher_n}: {where} holds only {len(teacher)} records")
    try:
        drawn = draw(teacher, args.teacher_n, weights, args.seed, where)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept + drawn)
    os.replace(tmp, args.out)
    out = {"onpolicy": dict(Counter(json.loads(x)["meta"]["source"] for x in kept)), "teacher": len(drawn),
           "teacher_families": dict(sorted(Counter(_key(x, where) for x in drawn).items())),
           "curriculum_weights": weights}
    write_json(args.out + ".stats.json", out)
    print(f"wrote {args.out}: {len(kept)} on-policy records {out['onpolicy'] or ''} and {len(drawn)} of the "
          f"teacher's{' (family curriculum)' if weights else ''}")
    return out


if __name__ == "__main__":
    run_main(main, "agentc.data.mix")
