"""Run the reliability batteries (slow tests included) and write their figures as JSON.

    python experiments/reliability.py            # about 10 minutes on 2 cores
    python experiments/reliability.py --out experiments/results/DATE-reliability.json

The figures are counted from the test outcomes, not written down: hostile solutions contained
(tests/test_sandbox.py, every backend that works here, with and without the audit hook), bad
inputs answered with one clean line (tests/test_errors.py), kill -9 trials survived and damaged
checkpoints recovered (tests/test_crash.py), fuzzed episodes without a crash (tests/test_fuzz.py).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

FILES = ["tests/test_sandbox.py", "tests/test_errors.py", "tests/test_crash.py", "tests/test_fuzz.py"]


def outcomes(junit: str) -> dict[str, str]:
    """test id -> passed | failed | skipped"""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname').split('.')[-1]}::{case.get('name')}"
        kinds = [c.tag for c in case]
        out[name] = "failed" if {"failure", "error"} & set(kinds) else "skipped" if "skipped" in kinds else "passed"
    return out


def count(results: dict[str, str], prefix: str) -> tuple[int, int]:
    """(passed, run) among the tests whose id starts with prefix (skipped ones are not run)."""
    mine = [v for k, v in results.items() if k.startswith(prefix) and v != "skipped"]
    return sum(v == "passed" for v in mine), len(mine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                  f"{datetime.date.today()}-reliability.json"))
    args = ap.parse_args()
    import torch
    from test_fuzz import N_FAST, N_SLOW
    from test_sandbox import AVAILABLE, NAMES

    from agentc.util import write_json
    with tempfile.TemporaryDirectory() as d:
        junit = os.path.join(d, "junit.xml")
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow or not slow", *FILES,
                            f"--junitxml={junit}"], cwd=ROOT)
        results = outcomes(junit)
    hostile = sum(len(NAMES) for k, v in results.items()
                  if k.startswith("test_sandbox::test_every_backend_contains_every_hostile_solution") and v == "passed")
    hostile_run = sum(len(NAMES) for k, v in results.items()
                      if k.startswith("test_sandbox::test_every_backend_contains_every_hostile_solution") and v != "skipped")
    errors = count({k: v for k, v in results.items()   # one bad input per test, except the wrapper's own
                    if not k.startswith(("test_errors::test_debug_", "test_errors::test_interrupt_"))},
                   "test_errors::test_")
    fuzz = {"test_fuzz::test_fuzzed_episodes_never_crash": N_FAST,
            "test_fuzz::test_a_thousand_fuzzed_episodes_never_crash": N_SLOW}
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    summary = {
        "date": str(datetime.date.today()), "commit": commit, "exit_status": p.returncode,
        "hostile_solutions": {"kinds": len(NAMES), "backends": AVAILABLE, "contained": hostile, "tried": hostile_run,
                              "note": "each kind under each backend, with and without the audit hook"},
        "bad_inputs": {"handled": errors[0], "tried": errors[1]},
        "kill_9": {"survived": 10 * (results.get("test_crash::test_kill_9_ten_times_then_resume_gives_identical_weights")
                                      == "passed"), "tried": 10},
        "damaged_checkpoints": dict(zip(("recovered", "tried"),
                                        count(results, "test_crash::test_corrupted_newest_checkpoint"))),
        "crash_tests": dict(zip(("passed", "run"), count(results, "test_crash::"))),
        "fuzzed_episodes_without_a_crash": sum(n for k, n in fuzz.items() if results.get(k) == "passed"),
        "fuzzed_episodes": sum(fuzz.values()),
        "tests": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    write_json(args.out, summary)
    print({k: v for k, v in summary.items() if k not in ("tests", "machine")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
