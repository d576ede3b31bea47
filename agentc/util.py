"""Small helpers every layer shares: atomic files, key=value arguments, an ordered worker pool.

Nothing here knows about workflows, tokens or models, so anything in agentc may import it.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import tempfile
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
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; our files should be readable like any other
    try:
        write(tmp)
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
