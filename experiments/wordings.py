"""How many distinct wordings each question family has, per split (agentc/workflows/phrasing.py).

    python experiments/wordings.py --n 4000 --out experiments/results/2026-12-05-wordings.json

Samples --n tasks of each split of each workflow and counts distinct prompt skeletons (the wording
with its slots unfilled, noise left out) per family; `test_unseen` is the share of test tasks whose
skeleton no sampled train task has. Those counts grow with --n, so `capacity` also counts the
distinct skeletons of --draws wordings of every template of the family in every register (still a
lower bound on what the grammar can say).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentc.util import run_main, write_json  # noqa: E402
from agentc.workflows.base import load_workflow, task_seed  # noqa: E402
from agentc.workflows.phrasing import REGISTERS  # noqa: E402

WORKFLOWS = ("sql", "files", "code", "shop", "support")


def capacity(wf, tasks: list, draws: int) -> dict[str, int]:
    templates = defaultdict(set)
    for t in tasks:
        templates[t.family].add(t.params["template_text"])
    rng, out = random.Random(0), {}
    for family, texts in templates.items():
        params = next(t.params for t in tasks if t.family == family)
        out[family] = len({wf.grammar.word(text, params, register, rng).skeleton
                           for text in texts for register in REGISTERS for _ in range(draws)})
    return out


def count(workflow: str, n: int, phrasing: str, draws: int) -> dict:
    wf = load_workflow(workflow, phrasing=phrasing)
    skeletons = {s: defaultdict(set) for s in ("train", "test")}
    heldout, unseen, per_family = Counter(), Counter(), Counter()
    tasks = {s: [wf.sample_task(s, i, task_seed(0 if s == "train" else 1, workflow, s, i)) for i in range(n)]
             for s in ("train", "test")}
    for s, ts in tasks.items():
        for t in ts:
            skeletons[s][t.family].add(t.wording)
    for t in tasks["test"]:
        heldout[t.heldout] += 1
        per_family[t.family] += 1
        unseen[t.family] += t.wording not in skeletons["train"][t.family]
    families = sorted(set(skeletons["train"]) | set(skeletons["test"]))
    cap = capacity(wf, tasks["train"] + tasks["test"], draws)
    return {"families": {f: {"train": len(skeletons["train"][f]), "test": len(skeletons["test"][f]),
                             "test_unseen": round(unseen[f] / max(1, per_family[f]), 3), "capacity": cap[f]}
                         for f in families},
            "test_heldout": dict(heldout)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="tasks sampled per split and workflow")
    ap.add_argument("--workflows", default=",".join(WORKFLOWS))
    ap.add_argument("--phrasing", default="rich", choices=("rich", "plain"), help="how train prompts are worded")
    ap.add_argument("--draws", type=int, default=300, help="wordings drawn per template and register (capacity)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = {"n": args.n, "phrasing": args.phrasing, "workflows": {}}
    for name in args.workflows.split(","):
        r = out["workflows"][name] = count(name, args.n, args.phrasing, args.draws)
        print(f"\n{name}: test tasks by wording {r['test_heldout']}")
        print(f"  {'family':<18} {'train':>6} {'test':>6} {'capacity':>9}  test wording unseen in train")
        for f, c in r["families"].items():
            print(f"  {f:<18} {c['train']:>6} {c['test']:>6} {c['capacity']:>9}  {100 * c['test_unseen']:.0f}%")
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    run_main(main, "experiments/wordings.py")
