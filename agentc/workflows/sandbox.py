"""Run untrusted Python (a model's code) in an isolated child; the verdict is computed here.

    report = run_tests(source, "count_x", [{"args": [[1, 2]], "expected": 2}, ...])
    outputs = run_calls(source, "count_x", [[[1, 2]], [[3]]])    # what each call returned or raised

The child receives the source and the arguments of each call on stdin and writes one line to
stdout: what each call returned (as JSON) or raised. Expected values never enter the child, and
this process compares; the most a hostile solution can forge is its own answers.

The layers, outermost first:
1. OS isolation (`isolation()`): bubblewrap, else `unshare`. New user, mount, network, PID, IPC
   and UTS namespaces; no capabilities; read-only /usr and Python install and nothing else of the
   host (no home, temp directory, repository or /etc); a 16 MB tmpfs as /tmp and working
   directory; a /proc that shows only the sandbox; an empty environment.
2. seccomp (x86-64, installed by the child before it reads the solution): no sockets, no new
   processes or programs, no ptrace or other processes' memory, no mounts or namespaces, no
   keyrings, bpf, perf or io_uring. Threads stay allowed.
3. rlimits: CPU seconds, address space, file size, open files, processes (the kernel exempts a
   caller that is root: there threads are bounded by memory and time); a wall clock here, and a
   cap on what the child may write to its pipes.
4. An audit hook that refuses sockets, processes, ctypes and writes outside the working directory
   with a readable message: a courtesy to honest code (the model reads the message), not part of
   the boundary.
Without a working layer 1 the sandbox refuses to run unless `allow_unsafe()` was called (the
commands' `--unsafe-sandbox`, or AGENTC_UNSAFE_SANDBOX=1): then only layers 2-4 hold.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

TIMEOUT_S = 5.0            # wall clock per run
CPU_S = 2                  # RLIMIT_CPU (soft; the hard limit is one second more)
MEMORY_BYTES = 512 << 20   # RLIMIT_AS
FILE_BYTES = 1 << 20       # RLIMIT_FSIZE: the largest file the child may write
TMPFS_BYTES = 16 << 20     # the child's /tmp under isolation
OUTPUT_BYTES = 1 << 20     # the most the child may write to stdout (its report included)
ERROR_BYTES = 64 << 10     # ... and to stderr
BACKENDS = ("bwrap", "unshare")

# The child's program: standard library only, run as `python -I -S`. It reads
# {"source", "function", "calls", "hook", "cwd", "limits"} from stdin, lowers its rlimits and
# installs its seccomp filter before it compiles the solution.
RUNNER = r'''
import ctypes, io, json, os, resource, signal, struct, sys, traceback

def seccomp():
    """A classic BPF filter (x86-64): the calls below fail with EPERM, clone3 with ENOSYS (so the C
    library falls back to clone), clone itself unless it makes a thread; another ABI is killed."""
    if os.uname().machine != "x86_64":
        return False
    deny = [41, 42, 43, 49, 50, 53, 288,        # socket connect accept bind listen socketpair accept4
            57, 58, 59, 322,                    # fork vfork execve execveat
            101, 310, 311,                      # ptrace process_vm_readv/writev
            165, 166, 155, 161, 272, 308,       # mount umount2 pivot_root chroot unshare setns
            248, 249, 250, 321, 298, 323,       # add_key request_key keyctl bpf perf_event_open userfaultfd
            425, 426, 427, 246, 320,            # io_uring_* kexec_load kexec_file_load
            175, 313, 176, 169, 167, 168, 163,  # init/finit/delete_module reboot swapon swapoff acct
            135, 133, 259,                      # personality mknod mknodat
            112, 109,                           # setsid setpgid: stay in the group the parent kills
            428, 429, 430, 431, 432, 433, 442,  # the new mount API
            304, 312, 434, 438, 440]            # open_by_handle_at kcmp pidfd_open pidfd_getfd process_madvise
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    n = len(deny)
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, 0xC000003E), (RET, 0, 0, KILL),     # the arch must be x86-64
            (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL),     # A = the call; no x32 calls
            (JEQ, 0, 1, 435), (RET, 0, 0, ENOSYS),                         # clone3
            (JEQ, 0, 4, 56), (LD, 0, 0, 16), (JSET, 0, 1, 0x10000),        # clone: flags & CLONE_THREAD?
            (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    prog += [(JEQ, n - i, 0, nr) for i, nr in enumerate(deny)] + [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    fprog = Fprog(len(prog), ctypes.addressof(buf))
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
        return False   # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP with SECCOMP_MODE_FILTER
    return True

request = json.loads(sys.stdin.read())
if request["cwd"]:
    os.chdir(request["cwd"])
cpu, memory, file_size = request["limits"]  # lowered by the child itself: no hard limit can rise again
for what, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                         (resource.RLIMIT_FSIZE, file_size, file_size), (resource.RLIMIT_NOFILE, 64, 64),
                         (resource.RLIMIT_NPROC, 32, 32), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(what, (soft, hard))
report = {"error": None, "outputs": [], "stdout": "", "seccomp": seccomp()}
out, real = io.StringIO(), os.fdopen(os.dup(1), "w")

def send():
    report["stdout"] = out.getvalue()[-2000:]
    real.write("\n" + json.dumps(report) + "\n")
    real.flush()

def out_of_time(signum, frame):
    report["error"] = "ran out of CPU time (an endless loop?)"
    send()
    os._exit(0)

signal.signal(signal.SIGXCPU, out_of_time)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.fork", "os.posix_spawn",
           "os.kill", "ctypes.", "shutil.rmtree", "os.remove", "os.rmdir", "os.rename")
HERE = os.getcwd()

def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2] or 0
        writes = set(mode) & set("wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        path = os.fsdecode(args[0])
        if writes and not os.path.realpath(path).startswith(HERE + os.sep):
            raise PermissionError(f"sandbox: writing {path} is not allowed")

if request["hook"]:
    sys.addaudithook(hook)
sys.stdout = sys.stderr = out
try:
    namespace = {"__name__": "solution"}
    exec(compile(request["source"], "solution.py", "exec"), namespace)
    fn = namespace.get(request["function"])
    if not callable(fn):
        report["error"] = f"solution.py does not define a function {request['function']}"
    else:
        for args in request["calls"]:
            try:
                report["outputs"].append({"value": json.loads(json.dumps(fn(*args), default=repr))})
            except Exception as e:
                report["outputs"].append({"raised": f"{type(e).__name__}: {e}"})
except Exception as e:
    tb = traceback.extract_tb(e.__traceback__)
    line = next((f.lineno for f in reversed(tb) if f.filename == "solution.py"), getattr(e, "lineno", None))
    report["error"] = f"{type(e).__name__}: {e}" + (f" (solution.py line {line})" if line and not isinstance(e, SyntaxError) else "")
send()
'''

# The unshare backend: as root of a new user namespace, build a root on a tmpfs with read-only
# binds, mount a /proc of the new PID namespace, then chroot and drop every capability.
UNSHARE_SETUP = r'''
set -eu
R=/tmp/.agentc-root
mount -t tmpfs -o size=1m,mode=755 agentc-root /tmp
mkdir -p $R && mount -t tmpfs -o size=1m,mode=755 agentc-root $R
for d in "$@"; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"
  else mkdir -p "$R$d" && mount --rbind "$d" "$R$d" && mount -o remount,bind,ro "$R$d"; fi
done
mkdir -p $R/proc $R/dev $R/tmp
mount -t proc -o ro proc $R/proc
for f in null zero urandom random; do touch $R/dev/$f && mount --bind /dev/$f $R/dev/$f; done
mount -t tmpfs -o size=TMPFS_BYTES,mode=1777 agentc-tmp $R/tmp
mount -o remount,ro $R
cd $R/tmp
exec env -i "$(command -v chroot)" $R "$(command -v setpriv)" --bounding-set=-all --inh-caps=-all --no-new-privs -- "$PY" -I -S -c "$RUNNER"
'''


@dataclass
class Report:
    error: str | None        # the solution did not load, crashed the run, or ran out of time/memory
    results: list[dict]      # per case: ok, got | raised
    stdout: str = ""

    @property
    def passed(self) -> int:
        return sum(r["ok"] for r in self.results)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r["ok"] for r in self.results)


@dataclass
class Outputs:
    error: str | None        # as Report.error
    outputs: list[dict]      # per call: {"value": ...} or {"raised": "Type: message"}
    stdout: str = ""
    seccomp: bool = False    # the child installed its seccomp filter
    isolation: str = "none"  # the backend it ran under


class SandboxUnavailable(RuntimeError):
    """No OS isolation works here and unsafe runs were not allowed."""


_unsafe = os.environ.get("AGENTC_UNSAFE_SANDBOX") == "1"


def allow_unsafe(on: bool = True) -> None:
    """Let model code run without OS isolation (rlimits, seccomp and the audit hook only). Also
    sets AGENTC_UNSAFE_SANDBOX so worker processes inherit the choice."""
    global _unsafe
    _unsafe = on
    os.environ["AGENTC_UNSAFE_SANDBOX"] = "1" if on else "0"
    if on:
        warnings.warn("--unsafe-sandbox: model-written code runs without OS isolation; it can read and "
                      "write this machine's files as this user, and read its environment", stacklevel=2)


def _python() -> tuple[str, str]:
    """The real interpreter (not a virtual environment's link) and the install it needs."""
    exe = os.path.realpath(sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _host_paths() -> list[str]:
    """What the child sees of the host: /usr, the top-level links or folders of the C library, and
    the Python install (when it lives outside /usr)."""
    paths = ["/usr"] + [p for p in ("/bin", "/lib", "/lib32", "/lib64") if os.path.lexists(p)]
    prefix = _python()[1]
    if not prefix.startswith("/usr/"):
        paths.append(prefix)
    return paths


def _argv(backend: str) -> list[str]:
    exe, _ = _python()
    if backend == "bwrap":
        argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", "65534", "--gid", "65534", "--clearenv", "--cap-drop", "ALL"]
        for p in _host_paths():
            argv += ["--symlink", os.readlink(p), p] if os.path.islink(p) else ["--ro-bind", p, p]
        # /proc and /dev read-only: the child's user maps to the caller's, root if we are root, and
        # procfs lets root's uid write kernel settings (/proc/sys) whatever its capabilities
        return argv + ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                       "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
                       "--remount-ro", "/", "--chdir", "/tmp", exe, "-I", "-S", "-c", RUNNER]
    if backend == "unshare":
        script = UNSHARE_SETUP.replace("TMPFS_BYTES", str(TMPFS_BYTES))
        return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--mount", "--pid",
                "--ipc", "--uts", "--fork", "--kill-child", "--", "/bin/sh", "-c", script, "sh", *_host_paths()]
    raise ValueError(f"unknown sandbox backend {backend!r}; choose from {BACKENDS}")


@functools.lru_cache(maxsize=None)
def _works(backend: str) -> bool:
    """Does `backend` start a child here? (one probe per process)"""
    if os.name != "posix" or not shutil.which(backend) or (backend == "unshare" and not shutil.which("setpriv")):
        return False
    out = _run("def f():\n    return 1\n", "f", [[]], backend, hook=True, timeout=20)
    return out.error is None and out.outputs == [{"value": 1}]


def isolation() -> str | None:
    """The first backend of BACKENDS that works here, or None."""
    return next((b for b in BACKENDS if _works(b)), None)


def require() -> str:
    """The backend model code will run under ("none" where unsafe runs are allowed and no backend
    works); raises SandboxUnavailable otherwise. Call it before a long run, to fail at once."""
    backend = isolation()
    if backend is None and not _unsafe:
        raise SandboxUnavailable(
            "running model code needs OS isolation: install bubblewrap (apt-get install bubblewrap), or allow "
            "unprivileged user namespaces for unshare; --unsafe-sandbox runs it without isolation")
    return backend or "none"


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the child exited without reading everything
        pass


def _communicate(p: subprocess.Popen, data: bytes, timeout: float) -> tuple[bytes, bytes, str | None]:
    """Feed stdin, read both pipes up to their caps until they close, the clock runs out or a cap is
    passed; then make sure the whole child is gone. Returns stdout, stderr and why it was stopped."""
    threading.Thread(target=_feed, args=(p.stdin, data), daemon=True).start()
    out, err, why = bytearray(), bytearray(), None
    caps = {p.stdout.fileno(): (out, OUTPUT_BYTES), p.stderr.fileno(): (err, ERROR_BYTES)}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for f in (p.stdout, p.stderr):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map() and why is None:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                buf, cap = caps[key.fd]
                if not chunk:
                    sel.unregister(key.fileobj)
                elif len(buf) + len(chunk) > cap:
                    why = f"it wrote more than {cap >> 10} KB"
                else:
                    buf += chunk
    try:
        p.wait(max(deadline - time.monotonic(), 0) if why is None else 0)
    except subprocess.TimeoutExpired:
        why = why or "timeout"
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    p.stdout.close()
    p.stderr.close()
    return bytes(out), bytes(err), why


def _run(source: str, function: str, calls: list[list], backend: str | None, hook: bool,
         timeout: float) -> Outputs:
    request = json.dumps({"source": source, "function": function, "calls": calls, "hook": hook,
                          "cwd": "/tmp" if backend == "unshare" else None,
                          "limits": [CPU_S, MEMORY_BYTES, FILE_BYTES]}).encode()
    # unisolated, the child works in a temporary directory of the host; isolated, in its own tmpfs
    with (tempfile.TemporaryDirectory(prefix="agentc-sandbox-") if backend is None
          else contextlib.nullcontext("/")) as cwd:
        argv = [_python()[0], "-I", "-S", "-c", RUNNER] if backend is None else _argv(backend)
        env = {"PY": _python()[0], "RUNNER": RUNNER, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"} \
            if backend == "unshare" else {}
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        out, err, why = _communicate(p, request, timeout)
    name = backend or "none"
    if why == "timeout":
        return Outputs(f"timed out after {timeout:g} s (an endless loop, or sleeping?)", [], isolation=name)
    if why:
        return Outputs(f"the test run was stopped: {why}", [], isolation=name)
    text = out.decode("utf-8", "replace").rstrip()
    try:
        report = json.loads(text.rsplit("\n", 1)[-1]) if text else None
    except json.JSONDecodeError:
        report = None
    except (ValueError, RecursionError):  # an integer past 4,300 digits, nesting past this stack
        return Outputs("the test run returned a value that cannot be read here (an integer too long, or "
                       "nested too deeply)", [], isolation=name)
    if not _well_formed(report, len(calls)):
        if isinstance(report, dict) and report.get("error") is None and isinstance(report.get("outputs"), list):
            return Outputs(f"the test run returned {len(report['outputs'])} results for {len(calls)} calls", [],
                           isolation=name)
        died = (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)
        how = ("ran out of memory" if b"MemoryError" in err else
               "ran out of CPU time" if p.returncode in died else f"exit status {p.returncode}")
        return Outputs(f"the test run died: {how}", [], isolation=name)
    error = None if report["error"] is None else _text(report["error"])
    outputs = [] if error is not None else [{"raised": _text(o["raised"])} if "raised" in o else o
                                            for o in report["outputs"]]
    return Outputs(error, outputs, _text(str(report["stdout"]))[-2000:], report["seccomp"] is True, name)


def _same(got, expected) -> bool:
    """Equal as JSON texts: types count (True is not 1, 1.0 is not 1), dict order does not."""
    try:
        return json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return False


def _text(s: str) -> str:
    """A string from the child as UTF-8 text: half a surrogate pair becomes its escape."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _well_formed(report, n: int) -> bool:
    if not isinstance(report, dict) or set(report) != {"error", "outputs", "stdout", "seccomp"}:
        return False
    if report["error"] is not None:
        return isinstance(report["error"], str) and report["error"] != ""
    outs = report["outputs"]
    return (isinstance(outs, list) and len(outs) == n and
            all(isinstance(o, dict) and (set(o) == {"value"} or set(o) == {"raised"} and isinstance(o["raised"], str))
                for o in outs))


def run_calls(source: str, function: str, calls: list[list], timeout: float = TIMEOUT_S,
              isolate: str | None = "auto", hook: bool = True) -> Outputs:
    """Define `source` in a sandboxed child and call `function(*args)` for each args list of
    `calls`. isolate: "auto" (the best backend here), "bwrap", "unshare", or None (no isolation,
    only where allowed). hook=False drops the audit hook (tests use it to check the rest holds)."""
    if isolate == "auto":
        backend = require()
        isolate = None if backend == "none" else backend
    elif isolate is not None and not _works(isolate):
        raise SandboxUnavailable(f"the {isolate} sandbox does not start here")
    return _run(source, function, calls, isolate, hook, timeout)


def run_tests(source: str, function: str, cases: list[dict], timeout: float = TIMEOUT_S,
              isolate: str | None = "auto", hook: bool = True) -> Report:
    """Run `function` on every case ({"args": [...], "expected": value}) in the sandbox and compare
    here, as JSON texts (_same)."""
    out = run_calls(source, function, [c["args"] for c in cases], timeout, isolate, hook)
    if out.error is not None:
        return Report(out.error, [], out.stdout)
    results = []
    for case, o in zip(cases, out.outputs):
        if "raised" in o:
            results.append({"ok": False, "raised": o["raised"]})
        else:
            results.append({"ok": _same(o["value"], case["expected"]), "got": o["value"]})
    return Report(None, results, out.stdout)
