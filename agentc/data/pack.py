"""Pack rendered trajectories into fixed-length rows and write memory-mapped shards.

    python -m agentc.data.pack --tokenizer data/sql/tok.model --seq-len 4096 --out data/sql/train data/sql/train.jsonl

A row holds seq_len + 1 tokens (inputs are row[:-1], targets row[1:]) made of whole documents
(trajectories) placed by best-fit decreasing; the rest of a row is <|pad|> with weight 0, kept as a
document of its own. The per-row document starts go to the index file, so attention never crosses
a document and positions restart at each one. The first token of every document is <|begin|> (or
<|pad|>), weight 0, so the prediction that crosses a boundary is never trained.

A trajectory longer than a row is never cut or lost silently: it is counted, reported and listed
in OUT.json, as are records with no trained token. A malformed record stops packing with an error
naming FILE:LINE (or, with --skip-bad, is reported and skipped).

Shard files (little-endian, all arrays C-contiguous, written atomically):
  OUT_000.bin  64-byte header: magic b"AGCTOKS\\0", u32 version, u32 token bytes (2|4),
               u64 n_rows, u64 row_len, u64 vocab_size
               then tokens [n_rows, row_len] uint16|uint32, weights [n_rows, row_len] float16,
               sources [n_rows, row_len] uint8 (index into agentc.data.format.SOURCES)
  OUT_000.idx  64-byte header: magic b"AGCIDX\\0\\0", u32 version, u32 0, u64 n_rows, u64 n_docs
               then row_ptr int64 [n_rows + 1] (row r's documents are row_ptr[r]:row_ptr[r+1]),
               doc_start int32 [n_docs] (position in its row), doc_id int64 [n_docs] (index of the
               record in the concatenated inputs, -1 for padding)
  OUT.json     summary: counts, trained share by source, packing efficiency, tokenizer, inputs
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import re
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from agentc.data.format import LAYOUT_VERSION, PAD, SOURCES, SRC_PAD, FormatError, render
from agentc.data.tokenizer import Tokenizer, load_tokenizer
from agentc.util import (ArgumentParser, atomic_write, ordered_map, parse_kv, progress_bar, read_json, run_main,
                         write_json)

SHARD_VERSION = 1
BIN_MAGIC, IDX_MAGIC = b"AGCTOKS\0", b"AGCIDX\0\0"
HEADER_BYTES = 64


# ----------------------------------------------------------------------------- shard files

def _write_arrays(path: str, header: bytes, arrays: list[np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            for a in arrays:
                f.write(np.ascontiguousarray(a).tobytes())
    atomic_write(path, write)


def write_shard(prefix: str, tokens: np.ndarray, weights: np.ndarray, sources: np.ndarray,
                row_ptr: np.ndarray, doc_start: np.ndarray, doc_id: np.ndarray, vocab_size: int) -> None:
    n_rows, row_len = tokens.shape
    tok_dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    _write_arrays(prefix + ".bin",
                  BIN_MAGIC + struct.pack("<IIQQQ", SHARD_VERSION, np.dtype(tok_dtype).itemsize, n_rows, row_len,
                                          vocab_size),
                  [tokens.astype(tok_dtype), weights.astype(np.float16), sources.astype(np.uint8)])
    _write_arrays(prefix + ".idx",
                  IDX_MAGIC + struct.pack("<IIQQ", SHARD_VERSION, 0, n_rows, len(doc_start)),
                  [row_ptr.astype(np.int64), doc_start.astype(np.int32), doc_id.astype(np.int64)])


class Shard:
    """One shard: the token arrays are memory-mapped (read when a row is asked for); the small
    document index is read whole."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        bin_path, idx_path = prefix + ".bin", prefix + ".idx"
        for p in (bin_path, idx_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"shard file missing: {p}")
        with open(bin_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != BIN_MAGIC:
            raise ValueError(f"{bin_path} is not an agentc token shard (bad magic)")
        version, tok_bytes, self.n_rows, self.row_len, self.vocab_size = struct.unpack("<IIQQQ", head[8:40])
        if version != SHARD_VERSION:
            raise ValueError(f"{bin_path}: shard version {version}, this code reads {SHARD_VERSION}; repack")
        tok_dtype = {2: np.uint16, 4: np.uint32}.get(tok_bytes)
        if tok_dtype is None:
            raise ValueError(f"{bin_path}: bad token width {tok_bytes}")
        n = self.n_rows * self.row_len
        expected = HEADER_BYTES + n * (tok_bytes + 2 + 1)
        if os.path.getsize(bin_path) != expected:
            raise ValueError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, header implies {expected} (truncated?)")
        shape = (self.n_rows, self.row_len)
        off = HEADER_BYTES
        self.tokens = np.memmap(bin_path, tok_dtype, "r", off, shape)
        off += n * tok_bytes
        self.weights = np.memmap(bin_path, np.float16, "r", off, shape)
        off += n * 2
        self.sources = np.memmap(bin_path, np.uint8, "r", off, shape)

        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != IDX_MAGIC:
            raise ValueError(f"{idx_path} is not an agentc shard index (bad magic)")
        version, _, n_rows, self.n_docs = struct.unpack("<IIQQ", head[8:32])
        if version != SHARD_VERSION or n_rows != self.n_rows:
            raise ValueError(f"{idx_path} does not match {bin_path} (version {version}, {n_rows} rows)")
        expected = HEADER_BYTES + 8 * (self.n_rows + 1) + 12 * self.n_docs
        if os.path.getsize(idx_path) != expected:
            raise ValueError(f"{idx_path}: {os.path.getsize(idx_path)} bytes, header implies {expected} (truncated?)")
        off = HEADER_BYTES
        self.row_ptr = np.fromfile(idx_path, np.int64, self.n_rows + 1, offset=off)
        off += 8 * (self.n_rows + 1)
        self.doc_start = np.fromfile(idx_path, np.int32, self.n_docs, offset=off)
        self.doc_id = np.fromfile(idx_path, np.int64, self.n_docs, offset=off + 4 * self.n_docs)

    def docs(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, doc_ids) of row r; starts[0] == 0."""
        a, b = self.row_ptr[r], self.row_ptr[r + 1]
        return self.doc_start[a:b], self.doc_id[a:b]


def find_shards(path: str) -> list[str]:
    """Shard prefixes for PATH: a prefix written by pack (data/sql/train, whose OUT.json lists its
    shards), that OUT.json, one shard's .bin, or a glob of shard files."""
    if path.endswith(".json"):
        path = path[:-5]
    if path.endswith(".bin"):
        path = path[:-4]
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; pass the --out prefix given to agentc.data.pack (e.g. data/sql/train)")
    if os.path.isfile(path + ".json"):  # the summary is the authority: stray files never sneak in
        names = read_json(path + ".json").get("shards")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}.json is not an agentc.data.pack summary (no list of \"shards\")")
        return [os.path.join(os.path.dirname(path), n) for n in names]
    if os.path.isfile(path + ".bin"):
        return [path]
    if any(c in path for c in "*?["):
        prefixes = sorted(p[:-4] for p in glob.glob(path + ".bin"))
    else:  # OUT.json is written last: numbered shards without it are a pack that did not finish
        prefixes = _numbered_shards(path)
        if prefixes:
            raise ValueError(f"{path}.json is missing: the pack that wrote {path}_000.bin... did not finish; "
                             "run agentc.data.pack again")
    if not prefixes:
        raise FileNotFoundError(f"no shards found for {path!r} (no {path}.json, {path}.bin or {path}_NNN.bin)")
    return prefixes


def packed_with(path: str) -> tuple[dict, str | None]:
    """The summary a pack wrote for PATH (its --out prefix or that .json; {} when there is none) and
    the tokenizer file it packed with, or None when it is gone or has changed since. The summary
    records the path as pack was given it, so the file of that name next to the summary (data moved
    as a folder) is tried too; its fingerprint must match."""
    summary_path = path if path.endswith(".json") else path + ".json"
    summary = read_json(summary_path) if os.path.exists(summary_path) else {}
    recorded = summary.get("tokenizer") or {}
    if recorded.get("path"):
        for p in (recorded["path"], os.path.join(os.path.dirname(summary_path), os.path.basename(recorded["path"]))):
            if os.path.isfile(p) and load_tokenizer(p).fingerprint == recorded.get("fingerprint"):
                return summary, p
    return summary, None


def _numbered_shards(prefix: str) -> list[str]:
    """Existing OUT_000, OUT_001, ... prefixes (exactly three digits, so train_2 never matches train)."""
    folder = os.path.dirname(prefix)
    if not os.path.isdir(folder or "."):
        return []
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_\d{3}\.bin")
    return sorted(os.path.join(folder, f[:-4]) for f in os.listdir(folder or ".") if pattern.fullmatch(f))


# ----------------------------------------------------------------------------- packing

def best_fit_decreasing(lengths: list[int], capacity: int, order: np.ndarray) -> list[list[int]]:
    """Place items (indices into lengths, visited longest first, ties in `order`) into bins of
    `capacity`, each into the fullest bin it fits in. Returns the bins as lists of item indices."""
    by_len = sorted(order.tolist(), key=lambda i: -lengths[i])  # stable: keeps the seeded order on ties
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in by_len:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            rest, b = capacity - lengths[i], len(bins) - 1
        else:
            rest, b = free.pop(k)
            bins[b].append(i)
            rest -= lengths[i]
        if rest > 0:
            bisect.insort(free, (rest, b))
    return bins


@dataclass
class _Doc:
    ids: np.ndarray
    sources: np.ndarray
    weights: np.ndarray
    origin: str = "teacher"  # meta.source: teacher, or an on-policy kind (agentc/runtime/onpolicy.py)


_TOK: Tokenizer | None = None
_SYSTEM = "keep"


def _init_worker(tok_path: str, system: str = "keep") -> None:
    global _TOK, _SYSTEM
    _TOK, _SYSTEM = load_tokenizer(tok_path), system


def _render_line(job: tuple[str, int, str]) -> tuple[_Doc | None, str | None, str | None, str | None]:
    """(document, error, name, "workflow\ttools JSON") of one JSONL line."""
    path, lineno, line = job
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg})", None, None
    msgs = record.get("messages") if isinstance(record, dict) else None
    if _SYSTEM == "drop" and isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) \
            and msgs[0].get("role") in ("system", "developer"):
        record = {**record, "messages": msgs[1:]}
    try:
        r = render(record, _TOK, name=where)
    except FormatError as e:
        return None, str(e), None, None
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    flow = {"name": meta.get("workflow", ""), "module": meta.get("workflow_module", meta.get("workflow", "")),
            "kwargs": meta.get("workflow_kwargs", {})}
    agent = f"{json.dumps(flow, sort_keys=True)}\t{json.dumps(record.get('tools') or [], sort_keys=True)}"
    origin = str(meta.get("source", "teacher"))
    return _Doc(r.ids, r.sources, r.weights.astype(np.float16), origin), None, str(meta.get("task_id", where)), agent


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.data.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="trajectory .jsonl files")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model with the agentc special tokens, or a .bpe.json (python -m agentc.data.bpe from-gguf)")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per training row (the model's context)")
    ap.add_argument("--out", required=True, help="output prefix: writes OUT_000.bin/.idx ... and OUT.json")
    ap.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file (default 2^26)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document and row order")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="rendering processes")
    ap.add_argument("--skip-bad", action="store_true", help="report malformed records and go on")
    ap.add_argument("--system", default="keep", choices=["keep", "drop"],
                    help="drop: leave every trajectory's system message out, so the instructions and tool "
                         "list are compiled into the weights; the agent records it and its runtime sends none")
    ap.add_argument("--weight", action="append", default=[], metavar="WORKFLOW=W",
                    help="mixture weight of a workflow's trajectories (repeatable): each is packed W times "
                         "on average (2: twice; 0.5: a seeded half; 0: none); others keep weight 1")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    ap.check_ranges(args, at_least={"seq_len": 2, "shard_tokens": 1, "workers": 1})
    mix = {}
    for item in args.weight:
        try:
            name, w = parse_kv(item, "--weight")
        except ValueError:
            name, w = None, None
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
            ap.error(f"--weight {item!r}: expected WORKFLOW=W with W >= 0")
        mix[name] = float(w)
    row_len = args.seq_len + 1
    try:
        tok = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        ap.error(f"--tokenizer: {e}")
    t0 = time.time()

    jobs, inputs = [], []
    for path in args.inputs:
        if not os.path.isfile(path):
            ap.error(f"{path}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")
        n = lineno = 0
        with open(path, encoding="utf-8") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        jobs.append((path, lineno, line))
                        n += 1
            except UnicodeDecodeError:
                ap.error(f"{path}:{lineno + 1}: not UTF-8 text")
        inputs.append({"path": path, "records": n})
    if not jobs:
        ap.error(f"{', '.join(args.inputs)}: no records (the inputs are empty)")

    docs: list[_Doc | None] = []
    names: list[str] = []
    flows: list[str] = []  # the workflow of each record ("" if its meta names none)
    agent_of: list[str | None] = []  # its "workflow\ttools" key
    agents = Counter()  # (workflow, tool schemas) -> trajectories: what a compiled agent will need
    bad: list[str] = []
    bar = progress_bar(len(jobs), "render", "traj", disable=args.quiet)
    with ordered_map(_render_line, jobs, args.workers, _init_worker, (args.tokenizer, args.system), 32) as results:
        try:
            for doc, err, name, agent in results:
                bar.update(1)
                if err is not None:
                    if not args.skip_bad:
                        raise SystemExit(f"error: {err} (fix the record, or pass --skip-bad to skip it)")
                    print(f"skipping malformed record: {err}", file=sys.stderr)
                    bad.append(err)
                docs.append(doc)
                names.append(name or "")
                flows.append(json.loads(agent.split("\t")[0])["name"] if agent is not None else "")
                agent_of.append(agent)
        finally:
            bar.close()

    overlong = [i for i, d in enumerate(docs) if d is not None and len(d.ids) > row_len]
    untrained = [i for i, d in enumerate(docs)
                 if d is not None and len(d.ids) <= row_len and not (d.weights > 0).any()]
    dropped = set(overlong) | set(untrained)
    keep = [i for i, d in enumerate(docs) if d is not None and i not in dropped]
    if not keep:
        raise SystemExit(f"error: no record of {', '.join(args.inputs)} fits in a row of {row_len} tokens and has "
                         f"a trained token ({len(overlong)} overlong, {len(untrained)} untrained, {len(bad)} malformed)")
    lengths = [len(d.ids) if d is not None else 0 for d in docs]
    rng = np.random.default_rng(args.seed)
    unknown = set(mix) - set(flows)
    if unknown:
        raise SystemExit(f"error: --weight names workflows the inputs do not hold: {sorted(unknown)} "
                         f"(they hold {sorted(set(flows) - {''})})")
    if mix:  # a record of weight W is packed floor(W) times, and once more with chance frac(W)
        w = np.array([mix.get(flows[i], 1.0) for i in keep])
        times = np.floor(w).astype(int) + (rng.random(len(keep)) < w - np.floor(w))
        keep = [i for i, t in zip(keep, times) for _ in range(t)]
        if not keep:
            raise SystemExit("error: the --weight values leave no record to pack")
    for i, n in Counter(keep).items():  # the compiled agent lists the workflows it was trained on
        if agent_of[i] is not None:
            agents[agent_of[i]] += n
    rows = best_fit_decreasing(lengths, row_len, rng.permutation(np.array(keep)))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # shards mix short and long documents

    # an earlier pack into the same prefix must not leave shards behind, nor a summary that would
    # make a pack killed half-way look complete: the summary goes first, and is written last
    if os.path.exists(args.out + ".json"):
        os.remove(args.out + ".json")
    stale = _numbered_shards(args.out)
    for prefix in stale:
        for ext in (".bin", ".idx"):
            if os.path.exists(prefix + ext):
                os.remove(prefix + ext)
    if stale:
        print(f"removed {len(stale)} shard(s) of an earlier pack into {args.out}", file=sys.stderr)

    pad_id = tok.special_ids[PAD]
    rows_per_shard = max(1, args.shard_tokens // row_len)
    shard_paths, n_docs = [], 0
    by_source = Counter()   # tokens per source
    trained = Counter()     # trained tokens (weight > 0) per source
    for s, first in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[first:first + rows_per_shard]
        tokens = np.full((len(chunk), row_len), pad_id, np.uint32)
        weights = np.zeros((len(chunk), row_len), np.float16)
        sources = np.full((len(chunk), row_len), SRC_PAD, np.uint8)
        row_ptr, doc_start, doc_id = [0], [], []
        for r, members in enumerate(chunk):
            pos = 0
            for i in members:
                d = docs[i]
                tokens[r, pos:pos + len(d.ids)] = d.ids
                weights[r, pos:pos + len(d.ids)] = d.weights
                sources[r, pos:pos + len(d.ids)] = d.sources
                doc_start.append(pos)
                doc_id.append(i)
                pos += len(d.ids)
            if pos < row_len:  # the padding is a document of its own
                doc_start.append(pos)
                doc_id.append(-1)
            row_ptr.append(len(doc_start))
        for src in range(len(SOURCES)):
            m = sources == src
            by_source[SOURCES[src]] += int(m.sum())
            trained[SOURCES[src]] += int((m & (weights > 0)).sum())
        prefix = f"{args.out}_{s:03d}"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        write_shard(prefix, tokens, weights, sources, np.array(row_ptr), np.array(doc_start),
                    np.array(doc_id), tok.vocab_size)
        shard_paths.append(prefix)
        n_docs += len(doc_id)

    total = len(rows) * row_len
    real = total - by_source["pad"]
    origins = Counter(docs[i].origin for i in keep)
    origin_trained = Counter()
    for i in keep:
        origin_trained[docs[i].origin] += int((docs[i].weights > 0).sum())
    summary = {
        "layout_version": LAYOUT_VERSION, "seq_len": args.seq_len, "row_len": row_len,
        "rows": len(rows), "documents": len(keep), "shards": [os.path.basename(p) for p in shard_paths],
        "tokens": total, "document_tokens": real, "padding_share": by_source["pad"] / total,
        "mean_tokens_per_document": real / len(keep),
        "max_tokens_per_document": max(lengths[i] for i in keep),
        "tokens_by_source": dict(by_source), "trained_tokens_by_source": dict(trained),
        "trained_share": sum(trained.values()) / real,
        # where the records came from (meta.source): the teacher, or the agent's own episodes
        "documents_by_origin": dict(origins), "trained_tokens_by_origin": dict(origin_trained),
        "overlong": {"count": len(overlong), "max_tokens": max((lengths[i] for i in overlong), default=0),
                     "records": [names[i] for i in overlong]},
        "untrained": {"count": len(untrained), "records": [names[i] for i in untrained]},
        "malformed": {"count": len(bad), "errors": bad},
        "tokenizer": {"path": os.path.abspath(args.tokenizer), "fingerprint": tok.fingerprint,
                      "vocab_size": tok.vocab_size},
        "inputs": inputs, "seed": args.seed, "seconds": round(time.time() - t0, 2), "weights": mix,
        "system": args.system,  # "drop": trained without system messages (the runtime then sends none)
        # the workflows the trajectories came from and their tools, for the compiled agent
        "workflows": [{**json.loads(a.split("\t")[0]), "tools": json.loads(a.split("\t", 1)[1]), "documents": n}
                      for a, n in agents.most_common() if json.loads(a.split("\t")[0])["name"]],
    }
    write_json(args.out + ".json", summary)
    print(f"packed {len(keep)} trajectories into {len(rows)} rows of {args.seq_len}+1 tokens "
          f"({len(shard_paths)} shard{'s' * (len(shard_paths) > 1)}) in {summary['seconds']}s: "
          f"{summary['mean_tokens_per_document']:.0f} tokens per trajectory, "
          f"{100 * summary['trained_share']:.1f}% trained, {100 * summary['padding_share']:.1f}% padding")
    for what, n in (("longer than a row", len(overlong)), ("with no trained token", len(untrained)),
                    ("malformed", len(bad))):
        if n:
            print(f"warning: {n} record(s) {what} were NOT packed; see {args.out}.json", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_main(main, "agentc.data.pack")
