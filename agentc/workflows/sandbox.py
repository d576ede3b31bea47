"""Run untrusted Python (a model's code) in a subprocess with limits.

    result = run_tests(source, "count_x", [{"args": [[1, 2]], "expected": 2}, ...])

The child runs `python -I` (no user site, no PYTHON* variables) in a fresh temporary directory
with an empty environment, closed stdin, RLIMIT_CPU, RLIMIT_AS and a wall-clock timeout. Before the
solution is imported, an audit hook (PEP 578) refuses network sockets, new processes, ctypes and
any file opened for writing outside that directory. This keeps honest mistakes (an infinite loop,
a huge list, a stray write) contained; it is not a security boundary against hostile code, which
would need a container or seccomp.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = 5.0          # wall clock per run
CPU_S = 2                # RLIMIT_CPU
MEMORY_BYTES = 512 << 20  # RLIMIT_AS

# The child's program. It reads solution.py and tests.json from its working directory and writes
# one JSON report to the stdout it was started with; what the solution prints is captured apart.
RUNNER = r'''
import io, json, os, sys, traceback
HERE = os.getcwd()
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.fork", "os.posix_spawn",
           "os.kill", "ctypes.", "shutil.rmtree", "os.remove", "os.rmdir", "os.rename")

def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2] or 0
        writes = set(mode) & set("wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        path = os.fsdecode(args[0])
        if writes and not os.path.abspath(path).startswith(HERE + os.sep):
            raise PermissionError(f"sandbox: writing {path} is not allowed")

tests = json.load(open("tests.json"))
out, real = io.StringIO(), sys.stdout
report = {"error": None, "results": [], "stdout": ""}
sys.addaudithook(hook)
sys.stdout = sys.stderr = out
try:
    namespace = {"__name__": "solution"}
    exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
    fn = namespace.get(tests["function"])
    if not callable(fn):
        report["error"] = f"solution.py does not define a function {tests['function']}"
    else:
        for case in tests["cases"]:
            try:
                got = fn(*case["args"])
                got = json.loads(json.dumps(got))
                report["results"].append({"ok": got == case["expected"], "got": got})
            except Exception as e:
                report["results"].append({"ok": False, "raised": f"{type(e).__name__}: {e}"})
except Exception as e:
    tb = traceback.extract_tb(e.__traceback__)
    line = next((f.lineno for f in reversed(tb) if f.filename == "solution.py"), getattr(e, "lineno", None))
    report["error"] = f"{type(e).__name__}: {e}" + (f" (solution.py line {line})" if line and not isinstance(e, SyntaxError) else "")
report["stdout"] = out.getvalue()[-2000:]
real.write("\n" + json.dumps(report, default=repr))
'''


@dataclass
class Report:
    error: str | None        # the solution did not load, crashed the runner, or ran out of time/memory
    results: list[dict]      # per case: ok, got | raised
    stdout: str = ""

    @property
    def passed(self) -> int:
        return sum(r["ok"] for r in self.results)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r["ok"] for r in self.results)


def _limits() -> None:  # runs in the child before exec
    import resource
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def run_tests(source: str, function: str, cases: list[dict], timeout: float = TIMEOUT_S) -> Report:
    """Import `source` as solution.py in a sandboxed child and call `function` on every case
    ({"args": [...], "expected": value}); results are compared after a JSON round trip."""
    with tempfile.TemporaryDirectory(prefix="agentc-sandbox-") as d:
        with open(os.path.join(d, "solution.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(d, "tests.json"), "w", encoding="utf-8") as f:
            json.dump({"function": function, "cases": cases}, f)
        try:
            p = subprocess.run([sys.executable, "-I", "-c", RUNNER], cwd=d, env={}, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout,
                               preexec_fn=_limits if os.name == "posix" else None)
        except subprocess.TimeoutExpired:
            return Report(f"timed out after {timeout:g} s (an endless loop?)", [])
        last = p.stdout.rstrip().rsplit("\n", 1)[-1] if p.stdout.strip() else ""
        try:
            report = json.loads(last)
        except json.JSONDecodeError:
            why = "ran out of CPU time" if p.returncode in (-9, -24) else (
                "ran out of memory" if "MemoryError" in p.stderr else f"exit status {p.returncode}")
            return Report(f"the test run died: {why}", [])
        return Report(report["error"], report["results"], report["stdout"])
