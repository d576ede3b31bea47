"""Packing into shards and loading batches: exact decode-back, nothing lost silently, the loader's
targets, weights, document offsets and rank split."""
import json
import os

import numpy as np
import pytest
import torch

from agentc.data import pack
from agentc.data.format import BEGIN, PAD, SRC_PAD, render, unrender
from agentc.data.loader import Loader
from agentc.data.pack import Shard, best_fit_decreasing, find_shards


def do_pack(corpus, out, *extra, inputs=None):
    args = (inputs or [corpus["jsonl"]]) + ["--tokenizer", corpus["tokenizer"], "--out", str(out), "--quiet",
                                            *map(str, extra)]
    return pack.main(args)


def records_of(path):
    return [json.loads(x) for x in open(path)]


@pytest.fixture(scope="module")
def packed(calc_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "train"
    summary = do_pack(calc_corpus, out, "--seq-len", 512, "--shard-tokens", 4000, "--workers", 2)
    return out, summary


def test_rows_decode_back_to_the_trajectories(any_corpus, tmp_path):
    out = tmp_path / "train"  # 2048-token rows: every SQL trajectory (presplit tokens) fits, several to a row
    summary = do_pack(any_corpus, out, "--seq-len", 2048, "--shard-tokens", 6000, "--workers", 2)
    tok = any_corpus["tok"]
    records = records_of(any_corpus["jsonl"])
    shards = [Shard(p) for p in find_shards(str(out))]
    assert len(shards) == len(summary["shards"]) > 1
    seen = []
    for sh in shards:
        assert sh.row_len == 2049 and sh.vocab_size == tok.vocab_size
        for r in range(sh.n_rows):
            starts, ids = sh.docs(r)
            assert starts[0] == 0 and (np.diff(starts) > 0).all()
            ends = list(starts[1:]) + [sh.row_len]
            for s, e, d in zip(starts, ends, ids):
                toks, w, src = sh.tokens[r, s:e], sh.weights[r, s:e], sh.sources[r, s:e]
                if d < 0:  # padding: only at the end of a row, never trained
                    assert e == sh.row_len and (toks == tok.special_ids[PAD]).all()
                    assert (w == 0).all() and (src == SRC_PAD).all()
                    continue
                seen.append(int(d))
                assert unrender(toks, tok, w) == records[d]["messages"]
                ref = render(records[d], tok)
                assert (toks == ref.ids).all() and (src == ref.sources).all() and (w == ref.weights).all()
    assert sorted(seen) == list(range(len(records)))  # every trajectory exactly once
    assert summary["documents"] == len(records) and summary["overlong"]["count"] == 0
    assert 0 < summary["trained_share"] < 1 and summary["trained_tokens_by_source"]["tool"] == 0


def test_system_drop_leaves_out_only_the_system_message(calc_corpus, tmp_path):
    """--system drop packs every trajectory without its system turn, and says so in the summary."""
    tok, records = calc_corpus["tok"], records_of(calc_corpus["jsonl"])
    assert all(r["messages"][0]["role"] == "system" for r in records)
    kept = do_pack(calc_corpus, tmp_path / "kept", "--seq-len", 1024)
    dropped = do_pack(calc_corpus, tmp_path / "drop", "--seq-len", 1024, "--system", "drop")
    assert kept["system"] == "keep" and dropped["system"] == "drop"
    system_tokens = sum(len(tok.encode(r["messages"][0]["content"])) + 1 for r in records)  # + <|system|>
    assert kept["document_tokens"] - dropped["document_tokens"] == system_tokens
    assert kept["tokens_by_source"]["model"] == dropped["tokens_by_source"]["model"]
    for sh in map(Shard, find_shards(str(tmp_path / "drop"))):
        for r in range(sh.n_rows):
            starts, ids = sh.docs(r)
            ends = list(starts[1:]) + [sh.row_len]
            for s, e, d in zip(starts, ends, ids):
                if d >= 0:
                    assert unrender(sh.tokens[r, s:e], tok, sh.weights[r, s:e]) == records[d]["messages"][1:]


def test_overlong_and_untrained_are_counted_not_lost(calc_corpus, tmp_path):
    records = records_of(calc_corpus["jsonl"])
    lengths = [len(render(r, calc_corpus["tok"])) for r in records]
    seq_len = sorted(lengths)[len(lengths) // 2] - 2  # about half the records do not fit in seq_len + 1
    untrained = json.loads(json.dumps(records[int(np.argmin(lengths))]))
    for m in untrained["messages"]:
        if m["role"] == "assistant":
            m["weight"] = 0
    untrained["meta"]["task_id"] = "all-weight-zero"
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(untrained) + "\n")
    s = do_pack(calc_corpus, tmp_path / "p", "--seq-len", seq_len, "--workers", 1,
                inputs=[calc_corpus["jsonl"], str(extra)])
    n_over = sum(n > seq_len + 1 for n in lengths)
    assert s["overlong"]["count"] == n_over > 0 and s["overlong"]["max_tokens"] == max(lengths)
    assert s["untrained"]["records"] == ["all-weight-zero"]
    assert s["documents"] + s["overlong"]["count"] + s["untrained"]["count"] == len(records) + 1
    assert json.load(open(str(tmp_path / "p") + ".json")) == s
    assert [i["records"] for i in s["inputs"]] == [len(records), 1]


def test_malformed_record_stops_with_its_line(calc_corpus, tmp_path):
    lines = open(calc_corpus["jsonl"]).read().splitlines()
    bad = json.loads(lines[1])
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{oops"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad), "not json", lines[2]]) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: .*not valid JSON"):
        do_pack(calc_corpus, tmp_path / "p", "--seq-len", 512, inputs=[str(path)])
    s = do_pack(calc_corpus, tmp_path / "p", "--seq-len", 512, "--skip-bad", inputs=[str(path)])
    assert s["malformed"]["count"] == 2 and s["documents"] == 2
    assert "bad.jsonl:3: not valid JSON" in s["malformed"]["errors"][1]


def test_corrupt_shards_are_refused(packed, tmp_path):
    out, summary = packed
    prefix = find_shards(str(out))[0]
    data = open(prefix + ".bin", "rb").read()
    for name, blob in (("magic", b"XXXXXXXX" + data[8:]), ("truncated", data[:-10])):
        p = tmp_path / name
        p.with_suffix(".bin").write_bytes(blob)
        p.with_suffix(".idx").write_bytes(open(prefix + ".idx", "rb").read())
        with pytest.raises(ValueError, match="bad magic" if name == "magic" else "truncated"):
            Shard(str(p))
    with pytest.raises(FileNotFoundError, match="no shards"):
        find_shards(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="is a directory"):
        find_shards(str(tmp_path))


def test_best_fit_decreasing_places_everything_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500).tolist()
    bins = best_fit_decreasing(lengths, 100, rng.permutation(500))
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 100 + 2  # near the lower bound on the bin count


# ----------------------------------------------------------------------------- loader

def test_batches_match_the_rows(calc_corpus, packed):
    out, summary = packed
    tok = calc_corpus["tok"]
    loader = Loader(str(out), batch_size=3, seed=5)
    T = loader.seq_len
    assert loader.n_rows == summary["rows"]
    for _ in range(4):
        rows = loader.rows_for_step(loader.step)
        b = loader.next_batch()
        assert b.tokens.shape == b.targets.shape == b.loss_weights.shape == (3, T)
        assert b.tokens.dtype == b.targets.dtype == torch.int64 and b.loss_weights.dtype == torch.float32
        assert torch.equal(b.tokens[:, 1:], b.targets[:, :-1])
        off = b.doc_offsets.tolist()
        assert b.doc_offsets.dtype == torch.int32 and off[0] == 0 and off[-1] == 3 * T
        assert all(x < y for x, y in zip(off, off[1:]))
        flat = b.tokens.flatten()
        begin = tok.special_ids[BEGIN]
        # every document starts with <|begin|> (or is padding), and no <|begin|> is inside one
        for s, e in zip(off, off[1:]):
            assert flat[s] in (begin, tok.special_ids[PAD])
            assert begin not in flat[s + 1:e].tolist()
        # a target that crosses into the next document is never trained
        wflat = b.loss_weights.flatten()
        assert all(wflat[e - 1] == 0 for e in off[1:] if e % T)
        pos = b.positions()
        assert pos.shape == (3, T) and (pos.flatten()[off[:-1]] == 0).all()
        for i, g in enumerate(rows):  # weights are the shard's weights of the target tokens
            s = int(np.searchsorted(loader.first_row, g, side="right")) - 1
            r = int(g - loader.first_row[s])
            assert np.array_equal(b.loss_weights[i].numpy(), loader.shards[s].weights[r, 1:].astype(np.float32))


def test_ranks_split_each_step_and_cover_the_epoch(packed):
    out, _ = packed
    world = 2
    loaders = [Loader(str(out), batch_size=2, rank=r, world_size=world, seed=1) for r in range(world)]
    steps = loaders[0].steps_per_epoch
    seen = []
    for step in range(steps):
        parts = [set(ld.rows_for_step(step).tolist()) for ld in loaders]
        assert not parts[0] & parts[1]
        seen += [x for p in parts for x in p]
    assert len(seen) == len(set(seen)) == steps * 4 and loaders[0].n_rows - len(seen) < 4
    # a new epoch is a new permutation
    assert loaders[0].rows_for_step(steps).tolist() != loaders[0].rows_for_step(0).tolist()
    # validation: the ranks read disjoint rows that cover all of them, one more at most on some
    for world in (2, 3):
        lds = [Loader(str(out), batch_size=2, rank=r, world_size=world) for r in range(world)]
        rows = [ld.pass_rows().tolist() for ld in lds]
        flat = [x for r in rows for x in r]
        assert sorted(flat) == list(range(lds[0].n_rows)) and max(map(len, rows)) - min(map(len, rows)) <= 1
        assert sum(b.tokens.shape[0] for ld in lds for b in ld.one_pass()) == lds[0].n_rows
        first = next(lds[1].one_pass())
        assert torch.equal(first.tokens, lds[1].read_rows(lds[1].pass_rows()[:2]).tokens)


def test_loader_state_resumes_the_stream(packed):
    out, _ = packed
    a = Loader(str(out), batch_size=2, seed=3)
    for _ in range(3):
        a.next_batch()
    b = Loader(str(out), batch_size=2, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch()))
    with pytest.raises(ValueError, match="seed"):
        Loader(str(out), batch_size=2, seed=4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="global_batch 2 vs 4"):
        Loader(str(out), batch_size=2, world_size=2, seed=3).load_state_dict(a.state_dict())
    c = Loader(str(out), batch_size=1, rank=1, world_size=2, seed=3)  # same global batch, split in two
    c.load_state_dict(a.state_dict())
    assert c.rows_for_step(c.step).tolist() == a.rows_for_step(a.step).tolist()[1:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Loader(str(out), batch_size=10_000).next_batch()
    with pytest.raises(ValueError, match="rank"):
        Loader(str(out), batch_size=1, rank=2, world_size=2)


def test_find_shards_accepts_every_spelling(packed):
    out, summary = packed
    prefixes = [os.path.join(os.path.dirname(out), n) for n in summary["shards"]]
    assert find_shards(str(out)) == prefixes == find_shards(str(out) + ".json")
    assert find_shards(prefixes[0] + ".bin") == [prefixes[0]]
    assert find_shards(str(out) + "_00[01]") == prefixes[:2]


def test_repacking_never_mixes_in_stale_shards(calc_corpus, tmp_path):
    out = tmp_path / "train"
    many = do_pack(calc_corpus, out, "--seq-len", 512, "--shard-tokens", 2000, "--workers", 1)
    do_pack(calc_corpus, tmp_path / "train_big", "--seq-len", 1024, "--workers", 1)  # a neighbour prefix
    few = do_pack(calc_corpus, out, "--seq-len", 256, "--workers", 1)
    assert len(many["shards"]) > 1 and few["shards"] == ["train_000"]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("train_0")) == ["train_000.bin", "train_000.idx"]
    json_path = str(out) + ".json"
    os.remove(json_path)  # without the summary (written last) the shards are a pack that did not finish
    with pytest.raises(ValueError, match="did not finish"):
        find_shards(str(out))
    assert find_shards(str(out) + "_000.bin") == [str(out) + "_000"]   # named explicitly, a shard still loads
    assert Loader(str(out) + "_000.bin", batch_size=1).row_len == 257
