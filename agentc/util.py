"""Small helpers every layer shares: atomic files, key=value arguments, an ordered worker pool,
the command-line plumbing every command uses (one-line errors, --debug), and progress display.

Nothing here knows about workflows, tokens or models, so anything in agentc may import it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, Iterable, Iterator

# ----------------------------------------------------------------------------- files


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp_path) fills a temp file next to `path`, which then replaces `path` in one rename:
    a reader (or a crash) sees the old file or the new one, never half of one. Same directory so
    os.replace stays on one filesystem, where it is atomic; fsync first so the data is on disk
    before the rename makes it visible."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600, and so do writers that replace the file they are given (safetensors);
        # our files should be readable like any other
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """`data` into `path`, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    """`text` into `path`, atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """`obj` as JSON into `path`, atomically, with a final newline."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str, kind: type | None = dict):
    """The JSON value in `path`. ValueError naming the file when it is not UTF-8 JSON, or when the
    value is not a `kind` (dict: a JSON object; None: anything). OSError (missing file, a directory)
    as open() raises it: it names the file already."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                         f"got {_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def read_jsonl(path: str) -> list[dict]:
    """The complete lines of a JSONL file that may end in a half-written line (a crash mid-write);
    ValueError naming the file and line for one that is not JSON."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.endswith("\n"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def dump_json(obj) -> str:
    """The one JSON serialisation of tool-call arguments and structured observations: what the
    workflows write and the token layout (agentc/data/format.py) renders."""
    return json.dumps(obj, ensure_ascii=False)


# ----------------------------------------------------------------------------- arguments


def parse_kv(item: str, what: str) -> tuple[str, object]:
    """'key=value' -> (key, value), the value read as JSON when it is JSON (numbers, true/false,
    lists, quoted strings) and kept as text otherwise: 'n_layers=6' -> ('n_layers', 6),
    'name=Lyon' -> ('name', 'Lyon'). ValueError, naming `what` (a flag), for anything else."""
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"{what} expects KEY=VALUE with KEY a name, got {item!r}")
    try:
        return key, json.loads(value.lower() if value.lower() in ("true", "false") else value)
    except json.JSONDecodeError:
        return key, value


# ----------------------------------------------------------------------------- commands


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the conventions of every agentc command: a --debug flag (show the full
    traceback of an error, see run_main) and usage errors as one line, `PROG: error: MESSAGE`
    (--help shows the usage), exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, show the full traceback instead of one line")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def check_ranges(self, args: argparse.Namespace, at_least: dict[str, float] | None = None,
                     positive: Iterable[str] = (), between: dict[str, tuple[float, float]] | None = None):
        """Range checks of parsed flags, named by dest ("max_len" is --max-len): the first one out of
        range is a usage error such as `--max-len must be at least 2, got 0`.

            ap.check_ranges(args, at_least={"seq_len": 2, "workers": 1}, positive=["tool_timeout"],
                            between={"mistake_rate": (0, 1)})

        Called after parse_args rather than given as type=: argparse would word those messages
        itself ("argument --max-len: ..."), and would not check defaults set from a saved run
        (train.py --resume). `not value >= low` rather than `value < low` so that a NaN fails too."""
        def fail(name, what):
            self.error(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
        for name, low in (at_least or {}).items():
            if not getattr(args, name) >= low:
                fail(name, f"at least {low}")
        for name in positive:
            if not getattr(args, name) > 0:
                fail(name, "positive")
        for name, (low, high) in (between or {}).items():
            if not low <= getattr(args, name) <= high:
                fail(name, f"between {low} and {high}")

    def flag(self, name: str, default, help: str, **kw):
        """--a-b, also spelled --a_b (W&B sweep files usually write underscores), both setting
        args.a_b; a bool default takes --flag, --flag=true and --flag=0; any other default gives the
        flag its type. train.py's flags are all made this way."""
        names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        if isinstance(default, bool):
            kw.update(type=str2bool, nargs="?", const=True)
        elif "type" not in kw and default is not None:
            kw["type"] = type(default)
        self.add_argument(*names, default=default, help=help, **kw)


def str2bool(s: str) -> bool:
    """An argparse type: 1/true/yes/on, 0/false/no/off."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def duration(s: str) -> float:
    """An argparse type: seconds from '3600', '90s', '45m' or '2h'."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(s[-1:].lower())
    try:
        return float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 3600, 90s, 45m or 2h, got {s!r}") from None


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_line(e: BaseException) -> str:
    """An exception as one line: an OSError as `FILE: what happened`; a plain ValueError (how our
    code reports a bad input, naming it) as its message; anything else with its type in front."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {e.strerror}"
    text = one_line(e)
    if type(e) is ValueError and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv


def run_main(main: Callable, prog: str, argv: list[str] | None = None):
    """main(argv) as a command: an error becomes one line on stderr, `PROG: what went wrong`, and
    exit status 1 (130 for Ctrl-C) instead of a traceback; with --debug among the arguments the
    exception propagates with its traceback, and an error message that main raised as SystemExit
    while handling an exception comes after that exception's traceback. SystemExit (usage errors,
    our own error messages) passes through as it is, except that a message is made one line.

        if __name__ == "__main__":
            run_main(main, "agentc.data.pack")
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if debug_requested(argv):
        try:
            return main(argv)
        except SystemExit as e:
            if e.code not in (0, None) and e.__context__ is not None:
                traceback.print_exception(e.__context__)  # the error behind the message
            raise
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(one_line(e.code)) from None
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        print(f"{prog}: {error_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def report_errors(prog: str, argv: list[str] | None = None) -> None:
    """run_main for a flat script (train.py), which has no main() to wrap: an exception that
    reaches the top is printed as one line (with --debug in argv: with its traceback). Python then
    exits with status 1, or dies of SIGINT after Ctrl-C (status 130 in a shell)."""
    if debug_requested(sys.argv[1:] if argv is None else argv):
        return

    def hook(kind, e, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
        else:
            print(f"{prog}: {error_line(e)}", file=sys.stderr)
    sys.excepthook = hook


# ----------------------------------------------------------------------------- processes


@contextlib.contextmanager
def ordered_map(fn: Callable, jobs: Iterable, workers: int = 1, initializer: Callable | None = None,
                initargs: tuple = (), chunksize: int = 1, start: str = "fork") -> Iterator[Iterator]:
    """fn over jobs, results in job order, so what a command writes does not depend on `workers`:
    in this process when workers <= 1 (after initializer(*initargs)), else in a pool of `workers`
    processes, each set up by initializer(*initargs) and started by `start` ("fork" where the
    platform has it; "spawn" for processes that must not inherit threads or a CUDA context). The
    pool is ended when the block is left, on an error too.

        with ordered_map(render, lines, workers=4, initializer=load, initargs=(path,)) as results:
            for r in results: ...
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield map(fn, jobs)
        return
    method = start if start in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, initializer, initargs)
    try:
        yield pool.imap(fn, jobs, chunksize)
    finally:
        pool.terminate()


# ----------------------------------------------------------------------------- progress


def progress_bar(total: int, desc: str, unit: str = "it", disable: bool = False, file=None, every: float = 30.0,
                 **tqdm_kw):
    """Progress over `total` units of work, shown on `file` (stderr by default): a tqdm bar on a
    terminal; elsewhere (a cluster's log file, a pipe), where a bar's carriage-return redraws pile
    up into one enormous line, a plain line every `every` seconds and one at the end (how many,
    how long, how fast). disable: nothing at all. Either has update(n), set_postfix(**kw), close()
    and works in a `with` block; tqdm_kw go to tqdm only.

        with progress_bar(len(jobs), "render", "traj", disable=args.quiet) as bar:
            for job in jobs: ...; bar.update()
    """
    file = sys.stderr if file is None else file
    if getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=file, **tqdm_kw)
    return ProgressLines(total, desc, unit, disable, file, every)


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressLines:
    """progress_bar off a terminal: whole lines, each ending in a newline."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool, file, every: float):
        self.total, self.desc, self.unit, self.disable, self.file, self.every = total, desc, unit, disable, file, every
        self.n, self.postfix, self.closed = 0, {}, False
        self.t0 = self.shown = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.shown >= self.every and 0 < self.n < self.total:
            self.shown = now
            left = (now - self.t0) / self.n * (self.total - self.n)
            self._line(f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
                       f"{_clock(now - self.t0)} elapsed, ~{_clock(left)} left, {self._rate(now)}")

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = kw

    def close(self) -> None:
        if self.closed or self.disable:
            return
        self.closed = True
        now = time.monotonic()
        took = f"in {_clock(now - self.t0)} ({self._rate(now)})"
        if self.n >= self.total:
            self._line(f"done, {self.n} {self.unit} {took}")
        else:  # left early: an error, or an interrupt
            self._line(f"stopped after {self.n}/{self.total} {self.unit} {took}")

    def _rate(self, now: float) -> str:
        rate = self.n / max(now - self.t0, 1e-9)
        return f"{rate:.1f} {self.unit}/s" if rate < 100 else f"{rate:,.0f} {self.unit}/s"

    def _line(self, text: str) -> None:
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {text}{extra}", file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
