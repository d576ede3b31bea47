"""Success by wording (seen, held-out combination, held-out template) of several evaluations, with
their 95% Wilson intervals, as one bar chart and one table.

    python experiments/plot_wording.py scratch=out/qs_rich_s1337/eval_test_incremental.json \
        smollm2=out/smol_rich/eval_test_incremental.json --out experiments/results/wording.png

Each argument is LABEL=SUMMARY, an infer.py --eval summary JSON (a mixture's summary gives one group
per workflow). Writes the PNG and, beside it, the table as JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentc.util import read_json, run_main, write_json  # noqa: E402

KINDS = ("seen", "combination", "template")


def rows(label: str, summary: dict) -> list[dict]:
    parts = summary["workflows"].items() if "workflows" in summary else [("", summary)]
    out = []
    for name, s in parts:
        if "by_wording" not in s:
            raise ValueError(f"{label}: the summary has no by_wording (made before the paraphrase grammar?)")
        out.append({"label": f"{label} {name}".strip(), "overall": s["success"],
                    **{k: s["by_wording"][k] for k in KINDS}})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=SUMMARY")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    table = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"plot_wording.py: {item!r} is not LABEL=SUMMARY")
        try:
            table += rows(label, read_json(path))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"plot_wording.py: {path}: {e}") from None
    for r in table:
        print(f"{r['label']:<28} " + "  ".join(
            f"{k} {100 * r[k]['rate']:5.1f}% [{100 * r[k]['ci95'][0]:.0f}-{100 * r[k]['ci95'][1]:.0f}] (n={r[k]['n']})"
            for k in ("overall",) + KINDS))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(table), 3.6))
    width = 0.8 / len(KINDS + ("overall",))
    for j, k in enumerate(("overall",) + KINDS):
        xs = [i + (j - 1.5) * width for i in range(len(table))]
        rates = [100 * r[k]["rate"] for r in table]
        err = [[100 * (r[k]["rate"] - r[k]["ci95"][0]) for r in table],
               [100 * (r[k]["ci95"][1] - r[k]["rate"]) for r in table]]
        ax.bar(xs, rates, width, yerr=err, capsize=3, label=k if k == "overall" else f"held-out {k}" if k != "seen" else k)
    ax.set_xticks(range(len(table)), [r["label"] for r in table], fontsize=8)
    ax.set_ylabel("success, % (95% interval)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    write_json(os.path.splitext(args.out)[0] + ".json", table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main, "experiments/plot_wording.py")
