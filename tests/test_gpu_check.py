"""runs/gpu_check.sh, the one prepared GPU check: its CPU dry run (`--dry-run`) runs the same steps
at their smallest shapes under Triton's interpreter, so a broken flag, import or output path shows
up here rather than on GPU time."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "runs", "gpu_check.sh")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_their_json(tmp_path):
    p = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert summary["mode"] == "dry" and summary["torch"]
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        (name, "passed") for name in ("tests", "attention", "ce", "train", "train_fsdp", "runtime")]
    assert "4 passed" in "\n".join(summary["steps"][0]["log_tail"])
    for name in ("attention_smoke", "ce_smoke", "train_dry", "train_fsdp_dry", "runtime_dry"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["device"] and result["torch"], name
    assert json.loads((tmp_path / "ce_smoke.json").read_text())["rows"]
    assert (tmp_path / "attention_smoke.png").stat().st_size > 0 and (tmp_path / "runtime_dry.png").stat().st_size > 0


def test_a_bad_argument_is_one_clear_line():
    p = subprocess.run(["bash", SCRIPT, "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "gpu_check.sh: unknown argument --fast (--dry-run or --fetch-wheels)"
