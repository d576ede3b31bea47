"""Time the data path end to end, as a user runs it: generate -> train the tokenizer -> pack.

    python experiments/bench_data.py --workflow sql --n 2000

Runs the three README commands as subprocesses, times each, and writes
experiments/results/DATE-data-WORKFLOW-N.json with the generation rate, tokens per trajectory, the
trained share, reject counts and the machine it ran on. Never run in CI.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from agentc.util import write_json  # noqa: E402
from experiments.bench_util import cpu, results_path  # noqa: E402


def timed(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default="sql")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--out-dir", default=None, help="where the data goes (default: a temporary directory)")
    args = ap.parse_args()
    d = args.out_dir or tempfile.mkdtemp(prefix="agentc-bench-")
    os.makedirs(d, exist_ok=True)
    py = sys.executable
    traj, tok = os.path.join(d, "train.jsonl"), os.path.join(d, "tok")
    times = {
        "generate": timed([py, "-m", "agentc.data.generate", "--workflow", args.workflow, "--split", "train",
                           "--n", str(args.n), "--out", traj, "--workers", str(args.workers), "--quiet"]),
        "tokenizer": timed([py, "-m", "agentc.data.tokenizer", "train", "--vocab-size", str(args.vocab_size),
                            "--out", tok, traj]),
        "pack": timed([py, "-m", "agentc.data.pack", "--tokenizer", tok + ".model", "--seq-len", str(args.seq_len),
                       "--out", os.path.join(d, "train"), "--quiet", traj]),
    }
    gen = json.load(open(traj + ".stats.json"))
    packed = json.load(open(os.path.join(d, "train.json")))
    result = {
        "workflow": args.workflow, "n": args.n, "workers": args.workers, "vocab_size": args.vocab_size,
        "seq_len": args.seq_len, "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(sum(times.values()), 1),
        "trajectories_per_s": round(gen["kept"] / times["generate"], 1),  # whole command, start-up included
        "kept": gen["kept"], "rejected_attempts": gen["rejected_attempts"], "lost_tasks": gen["lost_tasks"],
        "reject_kinds": gen["reject_kinds"], "mean_calls": round(gen["mean_calls"], 2),
        "mean_tokens_per_trajectory": round(packed["mean_tokens_per_document"], 1),
        "max_tokens_per_trajectory": packed["max_tokens_per_document"],
        "trained_share": round(packed["trained_share"], 4), "padding_share": round(packed["padding_share"], 4),
        "overlong": packed["overlong"]["count"], "tokens_by_source": packed["tokens_by_source"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "sentencepiece": version("sentencepiece"), "numpy": version("numpy"), **cpu()},
    }
    path = results_path(f"data-{args.workflow}-{args.n}")
    write_json(path, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
