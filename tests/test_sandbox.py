"""The sandbox against hostile solutions: each tries to forge its verdict, read or write the host,
reach the network, start processes, or exhaust a resource. Under OS isolation every one is
contained and the verdict stays correct, also with the audit hook off (the hook is a courtesy;
the namespaces, seccomp and rlimits are the boundary). The default run checks the first backend
that works here; the slow run checks every backend, with and without the hook."""
import os
import subprocess
import uuid

import pytest

from agentc.workflows import sandbox
from agentc.workflows.base import load_workflow
from agentc.workflows.sandbox import BACKENDS, SandboxUnavailable, run_calls, run_tests

AVAILABLE = [b for b in BACKENDS if sandbox._works(b)]
needs_isolation = pytest.mark.skipif(not AVAILABLE, reason="no OS isolation here (install bubblewrap)")

# The hidden tests: f(x) = 2 * x. No hostile solution below computes it, so every verdict must fail.
CASES = [{"args": [x], "expected": 2 * x} for x in (3, 5, 7)]
SECRET = "agentc-secret-" + uuid.uuid4().hex[:8]


def hostile(body: str) -> str:
    """A solution whose f runs `body` (indented) and returns its `found` list: what it managed."""
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return f"def f(x):\n    found = []\n{lines}\n    return found\n"


def attempt(action: str, what: str) -> str:
    """`action` (one statement) inside a try; on success `what` is appended to found."""
    return f"try:\n    {action}\n    found.append({what!r})\nexcept BaseException:\n    pass\n"


# name -> (source, what the parent checks: "verdict" only, or that f found nothing)
def battery(host_file: str, host_dir: str) -> dict[str, str]:
    return {
        # forging the verdict
        "empty the calls through __main__": "import __main__\nfor v in list(vars(__main__).values()):\n"
            "    if isinstance(v, list):\n        v.clear()\n    if isinstance(v, dict):\n"
            "        for w in v.values():\n            if isinstance(w, list):\n                w.clear()\n"
            "def f(x):\n    return 0\n",
        "fake report on stdout, then exit": "import json, os\n"
            "def f(x):\n    fake = {'error': None, 'outputs': [{'value': 2 * i} for i in range(3)], 'stdout': '',\n"
            "            'seccomp': True, 'results': [{'ok': True}] * 3}\n"
            "    os.write(1, ('\\n' + json.dumps(fake) + '\\n').encode())\n    os._exit(0)\n",
        "monkeypatch the comparison": "import json, builtins\n"
            "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
            "json.loads = lambda *a, **k: Yes(0)\njson.dumps = lambda *a, **k: 'true'\n"
            "builtins.all = lambda *a: True\n"
            "def f(x):\n    return Yes(0)\n",
        "object equal to everything": "class Any:\n    def __eq__(self, o):\n        return True\n"
            "    def __repr__(self):\n        return '6'\n"
            "def f(x):\n    return Any()\n",
        # the host
        "read host files": hostile(
            attempt(f"open({host_file!r}).read()", "repository file") +
            attempt("open('/etc/passwd').read()", "/etc/passwd") +
            attempt(f"os.listdir({host_dir!r})", "host dir") +
            attempt("os.listdir(os.path.expanduser('~'))", "home") +
            attempt("open('/proc/1/root/etc/hostname').read()", "/proc/1/root")).replace(
            "found = []", "import os\n    found = []"),
        "write outside the work directory": hostile(
            attempt(f"open({host_dir + '/escape.txt'!r}, 'w').write('x')", "host dir") +
            attempt("open('/usr/escape.txt', 'w').write('x')", "/usr") +
            attempt("__import__('os').open('/etc/escape.txt', __import__('os').O_CREAT | __import__('os').O_WRONLY)",
                    "/etc")),
        "read other processes' environment": hostile(
            "import os\nfor pid in os.listdir('/proc'):\n"
            + "\n".join("    " + line for line in attempt(
                f"assert {SECRET!r} in open(f'/proc/{{pid}}/environ').read() + open(f'/proc/{{pid}}/cmdline').read()",
                "secret").splitlines()) + "\n"
            + attempt(f"assert {SECRET!r} in str(os.environ)", "own environ")),
        # network and processes
        "sockets": hostile(
            attempt("__import__('socket').create_connection(('1.1.1.1', 53), timeout=1)", "inet") +
            attempt("__import__('socket').socket(__import__('socket').AF_UNIX).connect('/run/x')", "unix") +
            attempt("__import__('_socket').socket()", "_socket")),
        "new processes": hostile(
            attempt("__import__('subprocess').run(['/bin/true'], check=True)", "subprocess") +
            attempt("assert __import__('os').system('true') == 0", "os.system") +
            attempt("pid = __import__('os').fork()\n    if pid == 0: __import__('os')._exit(0)", "fork") +
            attempt("__import__('os').posix_spawn('/bin/true', ['true'], {})", "posix_spawn") +
            attempt("r, w = __import__('os').pipe()\n    assert __import__('_posixsubprocess').fork_exec("
                    "['/bin/true'], [b'/bin/true'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, "
                    "False, -1, None, None, None, -1, None, False) > 0", "fork_exec")),
        "ctypes": hostile(
            "import ctypes\n" +
            attempt("libc = ctypes.CDLL(None)\n    assert libc.syscall(57) >= 0", "raw fork") +
            attempt("assert ctypes.CDLL(None).socket(2, 1, 0) >= 0", "raw socket") +
            attempt("assert ctypes.CDLL(None).syscall(101, 16, 1, 0, 0) == 0", "ptrace attach") +
            attempt("assert ctypes.CDLL(None).unshare(0x10000000) == 0", "unshare")),
        "kernel settings and devices": hostile(
            "import os\n" + "".join(attempt(f"os.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))", p) for p in
                                    ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
                                     "/proc/self/oom_score_adj", "/dev/shm/fill", "/dev/fill"))),
        "outlive the run": "import ctypes, os, time\n"
            "def f(x):\n    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\n    try:\n        os.setsid()\n"
            "    except OSError:\n        pass\n    time.sleep(30)\n",
        "an empty error string": "import __main__\n__main__.report['error'] = ''\ndef f(x):\n    return 0\n",
        "a report the parent cannot read": "import os\n"
            "def f(x):\n    os.write(1, b'\\n' + b'[' * 100000 + b'\\n')\n    os._exit(0)\n",
        "kill the parent": "import os, signal\n"
            "def f(x):\n    for pid in (os.getppid(), 1):\n        try:\n            os.kill(pid, signal.SIGKILL)\n"
            "        except BaseException:\n            pass\n    return 0\n",
        "raise the limits": hostile(
            "import resource\n" +
            attempt("resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "cpu") +
            attempt("resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "memory")),
        # resources
        "endless loop": "def f(x):\n    while True:\n        pass\n",
        "memory bomb": "def f(x):\n    b = [bytearray(1 << 20) for _ in range(4096)]\n    return 0\n",
        "fill the disk": "import os\n"
            "def f(x):\n    for d in ('/tmp', '.', '/dev/shm', '/dev'):\n        for i in range(200):\n"
            "            try:\n                with open(f'{d}/fill{i}', 'wb') as fh:\n"
            "                    fh.write(b'x' * (1 << 20))\n            except BaseException:\n                break\n"
            "    return 0\n",
        "sleep past the wall clock": "import time\ndef f(x):\n    time.sleep(3600)\n",
        "thread bomb": "import threading, time\n"
            "def f(x):\n    while True:\n        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
        "flood stdout": "import os\ndef f(x):\n    while True:\n        os.write(1, b'x' * 65536)\n",
    }


@pytest.fixture
def host(tmp_path):
    """A file and a process of the host that hold a secret (the process in its environment)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    neighbour = subprocess.Popen(["sleep", "600"], env={"AGENTC_TEST_SECRET": SECRET})
    yield str(secret), str(tmp_path)
    neighbour.kill()
    neighbour.wait()


def check_contained(name: str, source: str, backend: str, hook: bool, host_dir: str) -> None:
    report = run_tests(source, "f", CASES, timeout=3, isolate=backend, hook=hook)
    assert not report.ok and report.passed == 0, (name, report)      # the verdict stays correct
    if source.startswith("def f(x):\n    found = []"):
        outs = run_calls(source, "f", [[1]], timeout=3, isolate=backend, hook=hook)
        assert outs.error is None and outs.outputs == [{"value": []}], (name, outs)  # nothing it tried worked
    assert not os.path.exists(os.path.join(host_dir, "escape.txt"))
    assert not os.path.exists("/usr/escape.txt") and not os.path.exists("/etc/escape.txt")
    for d in ("/tmp", "/dev/shm", host_dir, os.getcwd()):  # what the disk filler wrote stayed inside
        assert not [f for f in os.listdir(d) if f.startswith("fill")], (name, d)
    # no process of the child survives it (the runner's program is on its command line)
    left = subprocess.run(["pgrep", "-f", "request = json.loads"], capture_output=True, text=True).stdout
    assert not left.strip(), (name, left)


NAMES = list(battery("/x", "/y"))
# seconds of waiting for a limit each; the same limits' messages are checked in the default run by
# test_messages_for_honest_mistakes, and every backend meets these in -m slow
WAITING = {"endless loop", "sleep past the wall clock"}


@needs_isolation
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in WAITING else n for n in NAMES])
def test_hostile_solution_is_contained(name, host):
    """The first backend that works here, without the audit hook: the boundary alone."""
    check_contained(name, battery(*host)[name], AVAILABLE[0], False, host[1])


@pytest.mark.slow
@needs_isolation
@pytest.mark.parametrize("hook", [True, False])
@pytest.mark.parametrize("backend", AVAILABLE)
def test_every_backend_contains_every_hostile_solution(backend, hook, host):
    for name, source in battery(*host).items():
        check_contained(name, source, backend, hook, host[1])


@needs_isolation
@pytest.mark.parametrize("backend", AVAILABLE)
def test_backend_runs_honest_code_with_seccomp(backend):
    src = "import threading\ndef f(x):\n    out = []\n    t = threading.Thread(target=out.append, args=(2 * x,))\n" \
          "    t.start(); t.join()\n    open('scratch.txt', 'w').write('ok')\n    return out[0]\n"
    outs = run_calls(src, "f", [[3]], isolate=backend)
    assert outs.error is None and outs.outputs == [{"value": 6}] and outs.isolation == backend
    assert outs.seccomp is (os.uname().machine == "x86_64")
    assert run_tests(src, "f", CASES, isolate=backend).ok


@pytest.fixture
def unsafe(monkeypatch):
    """Unisolated runs allowed for one test."""
    monkeypatch.setattr(sandbox, "_unsafe", True)


def test_battery_is_not_vacuous(host, unsafe):
    """Without isolation or the hook, what the namespaces stop does work: the attempts are real."""
    for name, want in [("read host files", "repository file"), ("read other processes' environment", "secret")]:
        outs = run_calls(battery(*host)[name], "f", [[1]], isolate=None, hook=False)
        assert want in outs.outputs[0]["value"], (name, outs)


def test_comparison_counts_types(unsafe):
    backend = AVAILABLE[0] if AVAILABLE else None
    cases = [{"args": [1], "expected": 1}, {"args": [0], "expected": [0, {"a": 1, "b": 2}]}]
    assert not run_tests("def f(x):\n    return True if x else [False, {'b': 2, 'a': 1}]\n", "f", cases,
                         isolate=backend).passed
    assert not run_tests("def f(x):\n    return 1.0 if x else [0.0, {'b': 2, 'a': 1}]\n", "f", cases,
                         isolate=backend).passed
    assert run_tests("def f(x):\n    return 1 if x else (0, {'b': 2, 'a': 1})\n", "f", cases, isolate=backend).ok


def test_messages_for_honest_mistakes(unsafe):
    backend = AVAILABLE[0] if AVAILABLE else None
    loop = run_tests("def f(x):\n    while True:\n        pass\n", "f", CASES, isolate=backend)
    assert loop.error == "ran out of CPU time (an endless loop?)"
    sleep = run_tests("import time\ndef f(x):\n    time.sleep(60)\n", "f", CASES, timeout=1, isolate=backend)
    assert sleep.error.startswith("timed out after 1 s")
    bad = run_tests("def f(x):\n    return x\n", "f", CASES + [{"args": [0], "expected": 0}], isolate=backend)
    assert bad.passed == 1 and [r["got"] for r in bad.results] == [3, 5, 7, 0]
    short = run_tests("import __main__\n__main__.request['calls'].pop()\ndef f(x):\n    return 2 * x\n",
                      "f", CASES, isolate=backend)
    assert short.error == "the test run returned 2 results for 3 calls"


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: None)
    monkeypatch.setattr(sandbox, "_unsafe", False)
    monkeypatch.setenv("AGENTC_UNSAFE_SANDBOX", "0")
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*--unsafe-sandbox"):
        run_tests("def f(x):\n    return 2 * x\n", "f", CASES)
    with pytest.raises(SandboxUnavailable):
        load_workflow("code")                      # the workflow refuses at once, before any tool call
    with pytest.warns(UserWarning, match="without OS isolation"):
        sandbox.allow_unsafe(True)
    assert os.environ["AGENTC_UNSAFE_SANDBOX"] == "1"   # worker processes inherit the choice
    assert run_tests("def f(x):\n    return 2 * x\n", "f", CASES).ok
    assert load_workflow("code").sandbox == "none"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is written for x86-64")
@pytest.mark.parametrize("name", ["sockets", "new processes", "ctypes", "raise the limits"])
def test_seccomp_alone_stops_sockets_and_processes(name, host, unsafe):
    """No namespaces and no audit hook: the child's seccomp filter (and rlimits) still hold."""
    outs = run_calls(battery(*host)[name], "f", [[1]], isolate=None, hook=False)
    assert outs.seccomp and outs.outputs == [{"value": []}], outs
