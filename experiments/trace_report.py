"""Where an evaluation's episodes went wrong, from the traces infer.py --eval writes.

    python experiments/trace_report.py out/sql_mini/step_001700/traces_test_incremental.jsonl
    python experiments/trace_report.py A.jsonl B.jsonl --json report.json    # several runs, side by side

For each traces file: success by question family; errors the tools returned, by message (SQL
errors with the offending name); and what the model did right after its first error: sent the
same call again, sent another call that worked, or something else. A greedy decoder that repeats
a failing call until the step limit shows up as "repeated".
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter


def error_label(text: str) -> str:
    """A tool error as a short label: `no such column: x` keeps the name, other SQL errors their kind."""
    text = text.removeprefix("Error: ").removeprefix("SQLite error: ")
    m = re.match(r"(no such (?:column|table): \S+)", text)
    if m:
        return m.group(1)
    return re.sub(r'near ".*?"', 'near "..."', text.split("\n")[0])[:60]


def report(path: str) -> dict:
    episodes = [json.loads(line) for line in open(path) if line.strip()]
    if not episodes:
        raise SystemExit(f"{path}: no episodes")
    family, errors, after = {}, Counter(), Counter()
    for e in episodes:
        ok, n = family.get(e["family"], (0, 0))
        family[e["family"]] = (ok + e["success"], n + 1)
        calls = [s for s in e["steps"] if s["kind"] == "call"]
        for i, s in enumerate(calls):
            if s["observation_kind"] == "ok":
                continue
            errors[error_label(s["observation"] or "")] += 1
            if not any(c["observation_kind"] != "ok" for c in calls[:i]):  # the episode's first error
                nxt = calls[i + 1] if i + 1 < len(calls) else None
                if nxt is None:
                    after["stopped calling"] += 1
                elif (nxt["tool"], nxt["arguments"]) == (s["tool"], s["arguments"]):
                    after["repeated the call"] += 1
                elif nxt["observation_kind"] == "ok":
                    after["fixed it"] += 1
                else:
                    after["another failing call"] += 1
    return {"traces": path, "episodes": len(episodes), "success": sum(e["success"] for e in episodes),
            "failures": dict(Counter(e["failure"] for e in episodes if not e["success"]).most_common()),
            "by_family": {f: list(v) for f, v in sorted(family.items())},
            "episodes_with_an_error": sum(after.values()), "after_first_error": dict(after.most_common()),
            "tool_errors": sum(errors.values()), "top_errors": dict(errors.most_common(10))}


def show(r: dict) -> None:
    n = r["episodes"]
    print(f"{r['traces']}\n  success {r['success']}/{n} ({100 * r['success'] / n:.1f}%); failures: "
          + ", ".join(f"{k} {v}" for k, v in r["failures"].items()))
    print("  by family: " + ", ".join(f"{f} {a}/{b}" for f, (a, b) in r["by_family"].items()))
    print(f"  {r['episodes_with_an_error']} episodes hit a tool error; after the first one: "
          + (", ".join(f"{k} {v}" for k, v in r["after_first_error"].items()) or "-"))
    print(f"  {r['tool_errors']} tool errors in all; most common:")
    for k, v in r["top_errors"].items():
        print(f"    {v:5d}  {k}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", help="traces JSONL files from infer.py --eval")
    ap.add_argument("--json", default=None, help="also write the reports here")
    args = ap.parse_args(argv)
    reports = [report(p) for p in args.traces]
    for r in reports:
        show(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return reports


if __name__ == "__main__":
    main()
