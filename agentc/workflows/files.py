"""Files workflow: answer questions about, and make changes to, a generated file tree.

Every task gets its own tree (a small project: source, docs, configs, logs, notes and data files
in nested directories, about 25 files) built from the task's seed. The agent sees it only through
shell-like tools: ls, cat, grep, find, wc and write. Eleven question families, four of which
modify files; questions name a file by its base name, so the agent has to find it first.

Splits: file-name words, config keys and values, log messages and the words questions search for
come from pools partitioned by split_pool, so a test tree shares no file name and no searched
word with any train tree. Gold answers are computed from the generated tree, never by running the
teacher's calls, and modifying tasks are scored by hashing the whole final tree.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import posixpath
import random
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from agentc.workflows.base import (Answer, Call, Environment, Mistake, Resample, Task, ToolError, Verdict, Workflow,
                                   check_value, draw_family, resample, split_pool, tool)
from agentc.workflows.phrasing import Phrasing

# ----------------------------------------------------------------------------- pools

NOUNS = """apple anchor archive atlas badge banner basket beacon bridge bucket cabin canvas carbon castle
cedar chart circle cloud comet copper coral crane crystal dagger desert dolphin dragon ember engine
falcon feather fern fiber forest fossil garden garnet glacier granite harbor hazel helmet heron island
ivory jasmine jungle kernel kettle ladder lagoon lantern lemon lotus magnet maple marble meadow meteor
mirror monsoon mosaic nectar needle nickel oasis orbit orchid otter paddle panther parrot pebble pepper
pilot planet pocket prism quartz quiver radar raven ribbon river rocket saddle salmon scarlet shadow
signal silver spiral spruce summit sunset talon temple thunder timber topaz torch tulip tunnel
velvet violet voyage walnut willow window winter wizard zephyr""".split()
KEYS = """timeout retries port host workers verbose cache_size log_level max_items batch buffer interval
threshold region mode encoding locale theme backup_dir queue_len pool_size ttl replicas quota""".split()
VALUES = """alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar
papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu north south east west""".split()
EVENTS = """connection reset by peer|disk quota exceeded|cache miss storm|slow query detected|certificate
expires soon|worker restarted|queue backlog growing|checksum mismatch|login throttled|config reloaded|
heartbeat lost|index rebuilt|snapshot taken|retry budget spent|memory pressure high|socket timeout|
payload too large|lease renewed|shard rebalanced|token refreshed""".replace("\n", " ").split("|")
EVENTS = [e.strip() for e in EVENTS]
LEVELS = ("INFO", "INFO", "INFO", "WARN", "ERROR")
MARKERS = ("TODO", "FIXME")
TOP_DIRS = ("src", "docs", "config", "logs", "notes", "data")
EXT = {"src": "py", "docs": "md", "config": "cfg", "logs": "log", "notes": "txt", "data": "csv"}
MAX_LINES = 40   # files stay short enough that cat never cuts them


@functools.lru_cache(maxsize=None)
def pool(name: str, split: str, test_share: float) -> tuple:
    values = {"noun": NOUNS, "key": KEYS, "value": VALUES, "event": EVENTS}[name]
    return tuple(split_pool(values, split, test_share, salt=f"files-{name}"))


# ----------------------------------------------------------------------------- the tree

@dataclass
class Tree:
    files: dict[str, str]   # absolute path -> content
    dirs: set[str]          # absolute paths of every directory, "/" included

    def copy(self) -> "Tree":
        return Tree(dict(self.files), set(self.dirs))

    def digest(self) -> str:
        h = hashlib.sha256()
        for d in sorted(self.dirs):
            h.update(f"d\x1f{d}\x1e".encode())
        for p in sorted(self.files):
            h.update(f"f\x1f{p}\x1f{self.files[p]}\x1e".encode())
        return h.hexdigest()

    def under(self, path: str) -> list[str]:
        """Files at or below `path`, sorted."""
        if path in self.files:
            return [path]
        prefix = path.rstrip("/") + "/"
        return sorted(p for p in self.files if p.startswith(prefix))


def _lines(text: str) -> list[str]:
    return text.splitlines()


def build_tree(seed: int, split: str, test_share: float) -> Tree:
    """A project tree drawn from the split's pools: 4-6 top directories, some with a subdirectory,
    3-6 files each, every base name unique in the tree."""
    rng = random.Random(seed)
    nouns = pool("noun", split, test_share)
    used: set[str] = set()

    def fresh() -> str:  # a noun, or two joined by '_' once plain nouns get scarce
        while True:
            name = rng.choice(nouns) if rng.random() < 0.7 else "_".join(rng.sample(nouns, 2))
            if name not in used:
                used.add(name)
                return name
    keys, values, events = (pool(n, split, test_share) for n in ("key", "value", "event"))
    tree = Tree({}, {"/"})
    for top in rng.sample(TOP_DIRS, rng.randint(4, len(TOP_DIRS))):
        where = [f"/{top}"]
        if rng.random() < 0.6:
            where.append(f"/{top}/{fresh()}")
        for d in where:
            tree.dirs.add(d)
            for _ in range(rng.randint(2, 4)):
                path = f"{d}/{fresh()}.{EXT[top]}"
                tree.files[path] = _content(rng, top, keys, values, events)
    return tree


def _content(rng: random.Random, kind: str, keys, values, events) -> str:
    n = rng.randint(3, 14)
    if kind == "config":
        chosen = rng.sample(keys, min(n, len(keys)))
        lines = [f"{k} = {rng.choice(values) if rng.random() < 0.6 else rng.randint(1, 999)}" for k in chosen]
    elif kind == "logs":
        lines = [f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
                 f"{rng.randint(0, 59):02d} {rng.choice(LEVELS)} {rng.choice(events)}" for _ in range(n)]
    elif kind == "data":
        lines = ["id,name,amount"] + [f"{i},{rng.choice(values)},{rng.randint(1, 500)}" for i in range(1, n)]
    else:
        lines = []
        for _ in range(n):
            words = " ".join(rng.choice(values) for _ in range(rng.randint(2, 6)))
            if kind != "src":
                words = words[0].upper() + words[1:] + "."
            if rng.random() < 0.15:
                words = f"{rng.choice(MARKERS)}: {words}"
            lines.append(f"# {words}" if kind == "src" else words)
    return "\n".join(lines[:MAX_LINES]) + "\n"


def wc_counts(text: str) -> tuple[int, int, int]:
    return text.count("\n"), len(text.split()), len(text)


# ----------------------------------------------------------------------------- environment

class FilesEnv(Environment):
    def __init__(self, tree: Tree):
        self.tree = tree

    def _path(self, path: str) -> str:
        if not path.strip():
            raise ToolError("empty path")
        return posixpath.normpath(posixpath.join("/", path.strip()))

    def _file(self, path: str) -> str:
        p = self._path(path)
        if p in self.tree.dirs:
            raise ToolError(f"{p} is a directory")
        if p not in self.tree.files:
            raise ToolError(f"no such file: {p}")
        return p

    def _existing(self, path: str) -> str:
        p = self._path(path)
        if p not in self.tree.files and p not in self.tree.dirs:
            raise ToolError(f"no such file or directory: {p}")
        return p

    @tool
    def ls(self, path: str = "/") -> str:
        """List a directory: subdirectories end with '/'.

        Args:
            path: The directory (absolute, or relative to /).
        """
        p = self._existing(path)
        if p in self.tree.files:
            return p
        entries = [posixpath.basename(f) for f in self.tree.files if posixpath.dirname(f) == p]
        entries += [posixpath.basename(d) + "/" for d in self.tree.dirs if d != p and posixpath.dirname(d) == p]
        return "\n".join(sorted(entries)) or "(empty)"

    @tool
    def cat(self, path: str) -> str:
        """Show a file's content.

        Args:
            path: The file.
        """
        return self.tree.files[self._file(path)] or "(empty file)"

    @tool
    def grep(self, pattern: str, path: str = "/", count: bool = False) -> str:
        """Search files for a regular expression: prints path:line:text for every matching line of
        the file, or of every file below the directory.

        Args:
            pattern: A Python regular expression (plain words match themselves).
            path: A file or a directory.
            count: Print path:N, the number of matching lines per file, instead of the lines.
        """
        p = self._existing(path)
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ToolError(f"bad pattern {pattern!r}: {e}") from None
        out = []
        for f in self.tree.under(p):
            hits = [(i, line) for i, line in enumerate(_lines(self.tree.files[f]), 1) if rx.search(line)]
            if count and hits:
                out.append(f"{f}:{len(hits)}")
            elif not count:
                out += [f"{f}:{i}:{line}" for i, line in hits]
        return "\n".join(out) or "(no matches)"

    @tool
    def find(self, name: str, path: str = "/") -> str:
        """Find files below a directory whose base name matches a shell pattern.

        Args:
            name: The pattern, e.g. 'report.md' or '*.log'.
            path: Where to start.
        """
        p = self._existing(path)
        found = [f for f in self.tree.under(p) if fnmatch.fnmatchcase(posixpath.basename(f), name)]
        return "\n".join(found) or "(nothing found)"

    @tool
    def wc(self, path: str) -> str:
        """Count lines, words and characters of a file, or of each file in a directory (not below it).

        Args:
            path: A file or a directory.
        """
        p = self._existing(path)
        files = [p] if p in self.tree.files else [f for f in self.tree.under(p) if posixpath.dirname(f) == p]
        if not files:
            return "(no files)"
        return "\n".join("{} {} {} {}".format(*wc_counts(self.tree.files[f]), f) for f in files)

    @tool
    def write(self, path: str, content: str) -> str:
        """Create or overwrite a file with the given content (its directory must exist).

        Args:
            path: The file.
            content: The complete new content.
        """
        p = self._path(path)
        if p in self.tree.dirs:
            raise ToolError(f"{p} is a directory")
        if posixpath.dirname(p) not in self.tree.dirs:
            raise ToolError(f"no such directory: {posixpath.dirname(p)}")
        self.tree.files[p] = content
        return f"wrote {len(content)} characters to {p}"


# ----------------------------------------------------------------------------- question families
# A family draws its parameters from the task rng and the tree, computes the gold from the tree,
# and returns the teacher's plan: calls whose arguments may depend on earlier observations (a
# function of the observations so far), then the answer, also a function of them.

@dataclass
class Spec:
    params: dict
    gold: dict
    steps: list[tuple[str, dict | Callable[[list[str]], dict], tuple[str, ...]]]
    answer: Callable[[list[str]], str]
    answer_whys: tuple[str, ...]


def number(v) -> dict:
    return {"kind": "number", "value": v}


def text(v: str) -> dict:
    return {"kind": "text", "value": v}


def state(tree: Tree) -> dict:
    return {"kind": "state", "hash": tree.digest()}


def _base(path: str) -> str:
    return posixpath.basename(path)


def _pick(rng: random.Random, tree: Tree, kind: str | None = None) -> str:
    files = [p for p in sorted(tree.files) if kind is None or p.startswith(f"/{kind}/")]
    if not files:
        raise Resample
    return rng.choice(files)


def _find(name: str) -> tuple:
    return ("find", {"name": name}, (f"First I need to know where {name} is.", f"Let me locate {name}.",
                                     f"I'll find {name} in the tree first."))


def _found(obs: list[str]) -> str:
    return obs[-1].splitlines()[0]


def line_count(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree)
    return Spec({"file": _base(p)}, number(wc_counts(tree.files[p])[0]), [
        _find(_base(p)),
        ("wc", lambda obs: {"path": _found(obs)}, ("Now its line count.", "wc gives the number of lines."))],
        lambda obs: obs[-1].split()[0], ("wc reports {a} lines.", "The file has {a} lines."))


def locate(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree)
    return Spec({"file": _base(p)}, text(posixpath.dirname(p)), [_find(_base(p))],
                lambda obs: posixpath.dirname(_found(obs)), ("find shows it in {a}.", "It is in {a}."))


def config_value(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree, "config")
    key, value = rng.choice([line.split(" = ") for line in _lines(tree.files[p])])
    return Spec({"file": _base(p), "key": key}, text(value), [
        _find(_base(p)), ("cat", lambda obs: {"path": _found(obs)}, ("Let me read it.", "Now its content."))],
        lambda obs: next(line.split(" = ")[1] for line in _lines(obs[-1]) if line.split(" = ")[0] == key),
        ("The file sets {key} = {a}.", "{key} is {a} there."))


def count_level(rng, tree, split, ts) -> Spec:
    level = rng.choice(["ERROR", "WARN"])
    logs = [p for p in tree.files if p.startswith("/logs/")]
    if not logs:
        raise Resample
    n = sum(line.split()[2] == level for p in logs for line in _lines(tree.files[p]))
    return Spec({"level": level}, number(n), [
        ("grep", {"pattern": f" {level} ", "path": "/logs", "count": True},
         (f"Counting the {level} lines in every log under /logs.", f"grep can count {level} entries per file."))],
        lambda obs: str(sum(int(line.rsplit(":", 1)[1]) for line in _lines(obs[-1]) if ":" in line)),
        ("Adding the per-file counts gives {a}.", "In total {a}."))


def marker_files(rng, tree, split, ts) -> Spec:
    marker = rng.choice(MARKERS)
    hits = [p for p in sorted(tree.files) if any(line.lstrip("# ").startswith(marker + ":")
                                                 for line in _lines(tree.files[p]))]
    if not hits:
        raise Resample
    return Spec({"marker": marker}, {"kind": "list", "value": hits, "ordered": False}, [
        ("grep", {"pattern": f"{marker}:", "path": "/", "count": True},
         (f"grep over the whole tree will show which files have a {marker}.", f"Searching every file for {marker}."))],
        lambda obs: ", ".join(line.rsplit(":", 1)[0] for line in _lines(obs[-1])),
        ("These files contain it.", "grep found it in {n} file(s)."))


def longest_file(rng, tree, split, ts) -> Spec:
    d = rng.choice(sorted(tree.dirs - {"/"}))
    files = [p for p in tree.under(d) if posixpath.dirname(p) == d]
    counts = sorted((wc_counts(tree.files[p])[0], p) for p in files)
    if len(counts) < 2 or counts[-1][0] == counts[-2][0]:
        raise Resample
    return Spec({"dir": d}, text(_base(counts[-1][1])), [
        ("wc", {"path": d}, (f"wc on {d} counts the lines of each of its files.", f"Line counts of the files in {d}."))],
        lambda obs: _base(max((int(line.split()[0]), line.split()[3]) for line in _lines(obs[-1]))[1]),
        ("{a} has the most lines.", "The longest is {a}."))


def word_file(rng, tree, split, ts) -> Spec:
    """Which file mentions an event (a log message) that only one file has."""
    events = {}
    for p, body in tree.files.items():
        if p.startswith("/logs/"):
            for line in _lines(body):
                events.setdefault(line.split(" ", 3)[3], set()).add(p)
    unique = sorted(e for e, ps in events.items() if len(ps) == 1)
    if not unique:
        raise Resample
    event = rng.choice(unique)
    return Spec({"event": event}, text(next(iter(events[event]))), [
        ("grep", {"pattern": event, "path": "/logs"},
         (f"Searching the logs for '{event}'.", f"grep will show which log has '{event}'."))],
        lambda obs: obs[-1].split(":", 1)[0], ("Only {a} has it.", "It appears in {a}."))


def set_value(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree, "config")
    lines = _lines(tree.files[p])
    i = rng.randrange(len(lines))
    key, old = lines[i].split(" = ")
    new = rng.choice([v for v in pool("value", split, ts) if v != old])
    after = tree.copy()
    after.files[p] = "\n".join(lines[:i] + [f"{key} = {new}"] + lines[i + 1:]) + "\n"

    def rewritten(obs):
        body = [f"{key} = {new}" if line.split(" = ")[0] == key else line for line in _lines(obs[-1])]
        return {"path": _found(obs[:-1]), "content": "\n".join(body) + "\n"}
    return Spec({"file": _base(p), "key": key, "value": new}, state(after), [
        _find(_base(p)), ("cat", lambda obs: {"path": _found(obs)}, ("Let me read it first.", "Its current content:")),
        ("write", rewritten, (f"Writing it back with {key} = {new}.", f"Only the {key} line changes."))],
        lambda obs: f"Set {key} to {new} in {_base(p)}.", ("Done.", "The file is updated."))


def append_line(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree, "notes")
    note = " ".join(rng.choice(pool("value", split, ts)) for _ in range(3)).capitalize() + "."
    after = tree.copy()
    after.files[p] = tree.files[p] + note + "\n"
    return Spec({"file": _base(p), "line": note}, state(after), [
        _find(_base(p)), ("cat", lambda obs: {"path": _found(obs)}, ("I need its content to append to it.",
                                                                      "Reading it before adding the line.")),
        ("write", lambda obs: {"path": _found(obs[:-1]), "content": obs[-1] + note + "\n"},
         ("Writing it back with the new line at the end.", "Same content plus the new last line."))],
        lambda obs: f"Added the line to {_base(p)}.", ("Done.", "The line is added."))


def copy_file(rng, tree, split, ts) -> Spec:
    p = _pick(rng, tree)
    dest = rng.choice(sorted(d for d in tree.dirs - {"/", posixpath.dirname(p)}
                             if posixpath.join(d, _base(p)) not in tree.files) or resample())
    after = tree.copy()
    after.files[posixpath.join(dest, _base(p))] = tree.files[p]
    return Spec({"file": _base(p), "dir": dest}, state(after), [
        _find(_base(p)), ("cat", lambda obs: {"path": _found(obs)}, ("Reading it to copy it.", "Its content:")),
        ("write", lambda obs: {"path": posixpath.join(dest, _base(p)), "content": obs[-1]},
         (f"Writing the same content into {dest}.", f"Now the copy in {dest}."))],
        lambda obs: f"Copied {_base(p)} to {dest}.", ("Done.", "The copy is written."))


def create_file(rng, tree, split, ts) -> Spec:
    d = rng.choice(sorted(tree.dirs))
    taken = {_base(p) for p in tree.files}
    name = rng.choice([n for n in pool("noun", split, ts) if f"{n}.txt" not in taken]) + ".txt"
    body = " ".join(rng.choice(pool("value", split, ts)) for _ in range(4))
    after = tree.copy()
    path = posixpath.join(d, name)
    after.files[path] = body + "\n"
    return Spec({"path": path, "text": body}, state(after), [
        ("ls", {"path": d}, (f"Let me check {d} first.", f"Looking at {d} before writing."))] + [
        ("write", {"path": path, "content": body + "\n"}, (f"{name} is not there yet; creating it.",
                                                          f"Writing {path}."))],
        lambda obs: f"Created {path}.", ("Done.", "The file exists now."))


class Family(NamedTuple):
    sample: Callable
    templates: tuple[str, ...]


FAMILIES = {
    "line_count": Family(line_count, ("How many lines does {file} have?", "Count the lines of the file {file}.",
                                      "What is the line count of {file}?")),
    "locate": Family(locate, ("In which directory is {file}?", "Where is the file {file}? Give its directory.",
                              "Which folder holds {file}?")),
    "config_value": Family(config_value, ("What is {key} set to in {file}?", "In {file}, what value does {key} have?",
                                          "Read {file} and tell me the value of {key}.")),
    "count_level": Family(count_level, ("How many {level} entries are there in the logs under /logs?",
                                        "Count the {level} lines across all log files in /logs.",
                                        "What is the total number of {level} log lines in /logs?")),
    "marker_files": Family(marker_files, ("Which files contain a {marker} note?",
                                          "List every file that has a {marker}: line.",
                                          "Find all files with {marker} markers; give their paths.")),
    "longest_file": Family(longest_file, ("Which file directly in {dir} has the most lines?",
                                          "In {dir} (not its subdirectories), which file is the longest in lines?",
                                          "Name the file in {dir} with the largest number of lines.")),
    "word_file": Family(word_file, ("Which log file mentions '{event}'?", "Find the log that contains '{event}'.",
                                    "In which file under /logs does '{event}' appear?")),
    "set_value": Family(set_value, ("Set {key} to {value} in {file}.", "Change {key} in {file} to {value}.",
                                    "In {file}, update {key} so that it is {value}.")),
    "append_line": Family(append_line, ("Add the line '{line}' at the end of {file}.",
                                        "Append '{line}' to {file} as a new last line.",
                                        "Put '{line}' on a new line at the end of {file}.")),
    "copy_file": Family(copy_file, ("Copy {file} into {dir}.", "Make a copy of {file} in {dir}, same name.",
                                    "Put a copy of {file} in the directory {dir}.")),
    "create_file": Family(create_file, ("Create the file {path} containing: {text}",
                                        "Write a new file {path} with the text: {text}",
                                        "Make a file at {path} whose only line is: {text}")),
}


# ----------------------------------------------------------------------------- workflow

class FilesWorkflow(Workflow):
    name = "files"
    instructions = """You manage a project's files through shell-like tools. Paths are absolute (/docs/a.md).
Questions name files by their base name: find a file before reading or changing it. To answer a
question, reply with just the value: a number, a name, a path, or a comma-separated list of paths.
To change a file, write its complete new content, then reply with a short confirmation."""
    grammar = Phrasing({r"file": ("document",), r"lines": ("rows",), r"set to": ("configured as", "set as"),
                        r"tell me": ("give me", "report"), r"read": ("open", "look at"), r"value": ("setting",),
                        r"change": ("modify", "edit"), r"copy": ("duplicate",),
                        r"at the end of": ("at the bottom of", "after the last line of"), r"add": ("insert",),
                        r"append": ("add",), r"put": ("place", "write"), r"create": ("make",),
                        r"make": ("create",), r"update": ("change", "set"), r"so that it is": ("so it reads", "to be"),
                        r"set(?! to)": ("change", "update"), r"mentions": ("contains", "refers to"),
                        r"contains": ("includes", "mentions"), r"contain": ("include", "mention"),
                        r"appear": ("show up", "occur")}, protect=("logs",))

    def _build(self, split: str, index: int, seed: int) -> tuple[Task, Spec]:
        tree = build_tree(seed, split, self.test_share)
        rng = random.Random(seed)
        family, spec = draw_family(rng, FAMILIES, lambda f: FAMILIES[f].sample(rng, tree, split, self.test_share),
                                   seed)
        templates = FAMILIES[family].templates
        task = self.make_task(rng, split, index, seed, family, templates, spec.params, spec.gold, f"files-{family}")
        return task, spec

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        return self._build(split, index, seed)[0]

    def make_env(self, task: Task) -> FilesEnv:
        return FilesEnv(build_tree(task.seed, task.split, self.test_share))

    def teacher(self, task: Task, env: FilesEnv):
        spec = self._build(task.split, task.index, task.seed)[1]
        rng = random.Random(task.seed ^ 0x5EED)
        seen: list[str] = []
        for name, args, whys in spec.steps:
            obs = yield Call(name, args(seen) if callable(args) else args, rng.choice(whys))
            if not obs.ok:
                raise RuntimeError(f"teacher call failed: {obs.text}")
            seen.append(obs.text)
        answer = spec.answer(seen)
        why = rng.choice(spec.answer_whys).format(a=answer, n=answer.count(",") + 1, **spec.params)
        yield Answer(answer, why)

    def mistake(self, task: Task, env: FilesEnv, call: Call, rng: random.Random) -> Mistake | None:
        """Reading or changing a file at a guessed path (the right name in the wrong directory)."""
        if call.tool not in ("cat", "wc", "write") or call.args["path"] in env.tree.dirs:
            return None
        right = call.args["path"]
        wrong = [posixpath.join(d, _base(right)) for d in sorted(env.tree.dirs)
                 if posixpath.join(d, _base(right)) not in env.tree.files and d != posixpath.dirname(right)]
        if call.tool == "write":  # a write must fail too: only into a directory that does not exist
            wrong = [posixpath.join(posixpath.dirname(right), "tmp", _base(right))]
        if not wrong:
            return None
        w = rng.choice(wrong)
        return Mistake(Call(call.tool, call.args | {"path": w}, call.reasoning),
                       rng.choice((f"There is no {w}; the path is {right}.", f"Wrong path: it is {right}.")))

    def lookaround(self, call: Call) -> str | None:
        """ls, cat and find only look."""
        if call.tool in ("ls", "cat", "find"):
            return f"{call.tool}:" + "|".join(str(call.args.get(k, "")).strip().rstrip("/") for k in ("path", "name"))
        return None

    def state_key(self, env: FilesEnv) -> str:
        return env.tree.digest()

    def check(self, task: Task, env: FilesEnv, answer: str) -> Verdict:
        gold = task.gold
        if gold["kind"] == "state":
            ok = env.tree.digest() == gold["hash"]
            return Verdict(ok, "" if ok else "the files do not end in the expected state")
        return check_value(gold, answer)


WORKFLOW = FilesWorkflow
