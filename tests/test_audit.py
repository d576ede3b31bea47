"""python -m agentc.data.audit: the trained share by source, and failure (exit 1, every violation named)
when a non-model token is trained or a record trains nothing."""
import numpy as np
import pytest

from agentc.data import audit
from agentc.data.format import SOURCES, SRC_MODEL, SRC_TOOL, SRC_USER
from agentc.data.pack import Shard, find_shards, write_shard


def test_packed_corpus_passes(calc_shards, capsys):
    report = audit.main([calc_shards["train"], calc_shards["val"], "--quiet"])
    assert report["ok"] and report["records"] > 120 and report["trained_tokens"] > 0
    by = report["by_source"]
    assert by["model"]["trained"] == report["trained_tokens"] > 0
    assert all(by[s]["trained"] == 0 for s in SOURCES if s != "model")
    assert "OK" in capsys.readouterr().out


def copy_shard(src_prefix: str, dst_prefix: str, edit) -> None:
    s = Shard(src_prefix)
    tokens, weights, sources = (np.array(a) for a in (s.tokens, s.weights, s.sources))
    edit(weights, sources, s)
    write_shard(dst_prefix, tokens, weights, sources, s.row_ptr, s.doc_start, s.doc_id, s.vocab_size)


def test_trained_tool_token_and_untrained_record_fail(calc_shards, tmp_path, capsys):
    src = find_shards(calc_shards["train"])[0]

    def edit(weights, sources, shard):
        r, c = np.argwhere(sources == SRC_TOOL)[0]
        weights[r, c] = 1.0                                  # a tool token trained
        r2, c2 = np.argwhere(sources == SRC_USER)[0]
        weights[r2, c2] = 0.5                                # a user token trained
        starts, ids = shard.docs(1)
        end = starts[1] if len(starts) > 1 else shard.row_len
        weights[1, starts[0]:end] = 0                        # row 1's first record trains nothing
    copy_shard(src, str(tmp_path / "bad"), edit)
    with pytest.raises(SystemExit) as e:
        audit.main([str(tmp_path / "bad"), "--quiet", "--json", str(tmp_path / "a.json")])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL: 2 tokens that are not the model's own" in out
    assert "tool token, weight 1" in out and "user token, weight 0.5" in out
    assert "FAIL: 1 records have no trained token" in out and "row 1: record" in out


def test_untrained_model_tokens_are_allowed(calc_shards, tmp_path):
    """Mistakes kept in context: model tokens with weight 0 are fine, as long as the record
    trains something else."""
    src = find_shards(calc_shards["train"])[0]

    def edit(weights, sources, shard):
        r, c = np.argwhere((sources == SRC_MODEL) & (weights > 0))[0]
        weights[r, c] = 0
    copy_shard(src, str(tmp_path / "ok"), edit)
    assert audit.main([str(tmp_path / "ok"), "--quiet"])["ok"]


def test_missing_shards_give_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no shards found"):
        audit.main([str(tmp_path / "nowhere")])
