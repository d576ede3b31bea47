"""Audit what packed shards train: the share of trained tokens by source, and the two mistakes
that silently ruin a run.

    python -m agentc.data.audit data/sql/train                 # the --out prefix given to agentc.data.pack
    python -m agentc.data.audit data/sql/train data/sql/val --json audit.json

Fails (exit 1) when any token that is not the model's own (a template, user, tool or padding
token) carries loss weight, or when a record has no trained token at all (it costs compute and
teaches nothing). Every violation is listed (shard, row, position or record), up to --show of
each kind, with the total counts. The model's own tokens with weight 0 (deliberate mistakes kept
in context, see workflows/base.py) are allowed and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

from agentc.data.format import SOURCES, SRC_MODEL
from agentc.data.pack import Shard, find_shards
from agentc.util import ArgumentParser, progress_bar, read_json, run_main


def audit(paths: list[str], show: int = 10, progress: bool = True) -> dict:
    by_source = {s: {"tokens": 0, "trained": 0, "weight": 0.0} for s in SOURCES}
    bad_tokens, untrained_docs = [], []
    n_bad, n_untrained, n_docs, n_rows = 0, 0, 0, 0
    shards = [p for path in paths for p in find_shards(path)]
    for prefix in shards:
        shard = Shard(prefix)
        with progress_bar(shard.n_rows, f"audit {prefix}", "row", disable=not progress) as bar:
            for r in range(shard.n_rows):
                w = np.asarray(shard.weights[r], dtype=np.float32)
                src = np.asarray(shard.sources[r])
                trained = w != 0
                for i, name in enumerate(SOURCES):
                    here = src == i
                    by_source[name]["tokens"] += int(here.sum())
                    by_source[name]["trained"] += int((here & trained).sum())
                    by_source[name]["weight"] += float(w[here].sum())
                wrong = np.flatnonzero(trained & (src != SRC_MODEL))
                n_bad += len(wrong)
                for pos in wrong[:max(0, show - len(bad_tokens))]:
                    bad_tokens.append({"shard": prefix, "row": r, "position": int(pos), "source": SOURCES[src[pos]],
                                       "weight": float(w[pos])})
                starts, ids = shard.docs(r)
                ends = np.append(starts[1:], shard.row_len)
                for s, e, doc in zip(starts, ends, ids):
                    if doc < 0:  # padding
                        continue
                    n_docs += 1
                    if not trained[s:e].any():
                        n_untrained += 1
                        if len(untrained_docs) < show:
                            untrained_docs.append({"shard": prefix, "row": r, "record": int(doc)})
                n_rows += 1
                bar.update()
    total = sum(v["tokens"] for v in by_source.values())
    origins, origin_trained = Counter(), Counter()  # the packs' own counts by meta.source
    for path in paths:
        summary = path[:-5] if path.endswith(".json") else path
        if os.path.isfile(summary + ".json"):
            s = read_json(summary + ".json")
            origins.update(s.get("documents_by_origin") or {})
            origin_trained.update(s.get("trained_tokens_by_origin") or {})
    n_trained = sum(v["trained"] for v in by_source.values())
    return {
        "shards": shards, "rows": n_rows, "records": n_docs, "tokens": total, "trained_tokens": n_trained,
        "trained_share": n_trained / total if total else 0.0,
        "by_source": {k: {**v, "share_of_tokens": v["tokens"] / total if total else 0.0,
                          "trained_share": v["trained"] / v["tokens"] if v["tokens"] else 0.0}
                      for k, v in by_source.items()},
        "trained_non_model_tokens": n_bad, "records_without_trained_tokens": n_untrained,
        "examples": {"trained_non_model_tokens": bad_tokens, "records_without_trained_tokens": untrained_docs},
        "by_origin": {k: {"records": n, "share_of_records": n / max(1, sum(origins.values())),
                          "trained_tokens": origin_trained[k],
                          "share_of_trained": origin_trained[k] / max(1, sum(origin_trained.values()))}
                      for k, n in sorted(origins.items())},
        "ok": n_bad == 0 and n_untrained == 0,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.data.audit", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+", help="agentc.data.pack --out prefixes (or their .json, or shard files)")
    ap.add_argument("--show", type=int, default=10, help="violations listed per kind")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    ap.check_ranges(args, at_least={"show": 0})
    try:
        report = audit(args.shards, args.show, progress=not args.quiet)
    except (OSError, ValueError) as e:
        raise SystemExit(f"agentc.data.audit: {e}") from None
    print(f"{report['records']:,} records in {report['rows']:,} rows of {len(report['shards'])} shard(s): "
          f"{report['trained_tokens']:,} of {report['tokens']:,} tokens trained ({report['trained_share']:.1%})")
    print(f"  {'source':9s} {'tokens':>12s} {'of all':>7s} {'trained':>12s} {'trained share':>14s}")
    for name, v in report["by_source"].items():
        print(f"  {name:9s} {v['tokens']:12,d} {v['share_of_tokens']:7.1%} {v['trained']:12,d} {v['trained_share']:14.1%}")
    if len(report["by_origin"]) > 1 or any(k != "teacher" for k in report["by_origin"]):
        print(f"  {'origin':17s} {'records':>9s} {'of all':>7s} {'trained tokens':>15s} {'of trained':>10s}")
        for name, v in report["by_origin"].items():
            print(f"  {name:17s} {v['records']:9,d} {v['share_of_records']:7.1%} {v['trained_tokens']:15,d} "
                  f"{v['share_of_trained']:10.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if report["ok"]:
        print("OK: only the model's own tokens are trained, and every record trains some")
        return report
    if report["trained_non_model_tokens"]:
        print(f"FAIL: {report['trained_non_model_tokens']:,} tokens that are not the model's own carry loss weight, e.g.:")
        for x in report["examples"]["trained_non_model_tokens"]:
            print(f"  {x['shard']} row {x['row']} position {x['position']}: {x['source']} token, weight {x['weight']:g}")
    if report["records_without_trained_tokens"]:
        print(f"FAIL: {report['records_without_trained_tokens']:,} records have no trained token, e.g.:")
        for x in report["examples"]["records_without_trained_tokens"]:
            print(f"  {x['shard']} row {x['row']}: record {x['record']}")
    sys.exit(1)


if __name__ == "__main__":
    run_main(main, "agentc.data.audit")
