"""Progress display (agentc/util.py progress_bar): a tqdm bar on a terminal; in a file or a pipe,
whole short lines and a summary line at the end, never a carriage return. The commands' data
files do not depend on it."""
import io
import os
import subprocess
import sys

from tqdm import tqdm

from agentc import util
from agentc.data import audit, pack
from agentc.util import ProgressLines, progress_bar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def assert_file_friendly(text: str, summary: str):
    """No carriage return, no long line, and a summary line that starts with `summary`."""
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and max(len(x) for x in lines) < 300, max(lines, key=len)
    assert any(x.startswith(summary) for x in lines), text


def test_lines_every_interval_and_a_summary(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(util.time, "monotonic", lambda: clock[0])  # a fake clock: 10 s per item
    out = io.StringIO()
    with progress_bar(12, "work", "item", file=out) as bar:
        assert isinstance(bar, ProgressLines)
        for i in range(12):
            clock[0] += 10
            bar.set_postfix(kept=i + 1)  # as generate does: the counts first, then the line update() may print
            bar.update()
    lines = out.getvalue().splitlines()
    assert out.getvalue().endswith("\n") and "\r" not in out.getvalue()
    assert lines[:3] == ["work: 3/12 item (25%), 30.0s elapsed, ~01:30 left, 0.1 item/s, kept=3",
                         "work: 6/12 item (50%), 01:00 elapsed, ~01:00 left, 0.1 item/s, kept=6",
                         "work: 9/12 item (75%), 01:30 elapsed, ~30.0s left, 0.1 item/s, kept=9"]
    assert lines[3:] == ["work: done, 12 item in 02:00 (0.1 item/s), kept=12"]  # one summary, at 12/12


def test_stopped_early_and_disabled():
    out = io.StringIO()
    bar = progress_bar(5, "work", "item", file=out)
    bar.update(2)
    bar.close()
    bar.close()  # a second close adds nothing
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("work: stopped after 2/5 item in ")
    quiet = io.StringIO()
    with progress_bar(5, "work", "item", disable=True, file=quiet, every=0) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    tty = FakeTTY()
    with progress_bar(3, "work", "item", file=tty) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()


def test_generate_into_a_pipe(tmp_path):
    """The real command, stderr a pipe as on a cluster: plain lines, a summary, the same data as --quiet."""
    args = [sys.executable, "-m", "agentc.data.generate", "--workflow", "tests.fake_workflow", "--split", "train",
            "--n", "6", "--workers", "1"]
    loud = subprocess.run(args + ["--out", str(tmp_path / "a.jsonl")], capture_output=True, text=True, cwd=ROOT)
    quiet = subprocess.run(args + ["--out", str(tmp_path / "b.jsonl"), "--quiet"], capture_output=True, text=True,
                           cwd=ROOT)
    assert loud.returncode == quiet.returncode == 0, loud.stderr
    assert_file_friendly(loud.stderr, "calc/train: done, 6 task in ")
    assert "calc/train:" not in quiet.stderr                       # --quiet: no progress at all
    assert "trajectories kept" in loud.stdout and "trajectories kept" in quiet.stdout
    for name in ("", ".rejects.jsonl", ".stats.json"):
        a, b = open(tmp_path / f"a.jsonl{name}").read(), open(tmp_path / f"b.jsonl{name}").read()
        if name == ".stats.json":  # timings differ from run to run
            a, b = ([x for x in s.splitlines() if "_per_s" not in x and "seconds" not in x] for s in (a, b))
        assert a == b, name


def test_pack_and_audit_into_a_file(calc_corpus, calc_shards, tmp_path, capsys):
    common = [calc_corpus["jsonl"], "--tokenizer", calc_corpus["tokenizer"], "--seq-len", "512"]
    pack.main(common + ["--out", str(tmp_path / "loud")])
    err = capsys.readouterr().err  # capsys's stderr is not a terminal
    assert_file_friendly(err, f"render: done, {len(open(calc_corpus['jsonl']).readlines())} traj in ")
    pack.main(common + ["--out", str(tmp_path / "quiet"), "--quiet"])
    assert capsys.readouterr().err == ""
    loud = sorted(f for f in os.listdir(tmp_path) if f.startswith("loud") and not f.endswith(".json"))
    assert loud and all(open(tmp_path / f, "rb").read() == open(tmp_path / f.replace("loud", "quiet"), "rb").read()
                        for f in loud)
    audit.main([calc_shards["train"]])
    err = capsys.readouterr().err
    assert_file_friendly(err, f"audit {calc_shards['train']}")
    assert all(": done, " in x for x in err.splitlines()), err  # one summary per shard
