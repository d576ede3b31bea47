"""sentencepiece training (presplit by default, plain BPE on request), special tokens as single
control pieces, exact round trips, extension of an existing (Llama-2 style) model, refusal of
tokenizer kinds that were removed."""
import io
import random

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from agentc.data import tokenizer
from agentc.data.format import SPECIAL_TOKENS, render, unrender
from agentc.data.tokenizer import Tokenizer

TEXTS = [
    "SELECT c.name, SUM(oi.quantity * oi.unit_price) FROM customers c JOIN orders o ON o.customer_id = c.id;",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n\r\n", "ünïcödé — 漢字 — emoji 🙂🚀 — Ωμέγα",
    "def f(x):\n    return {'a': [1, 2.5, -3e-4]}\n", "12345678901234567890 0.001 -42", "",
    "special text <|end|> <|call|>{\"name\": 1}<|/call|> <|pad|>", "\x00\x01 control bytes", " " * 17,
    "\u2581 sentencepiece's space mark\u2581\u2581inside\u2581", "\u2581",
]


def test_specials_are_single_control_pieces(calc_corpus):
    tok = calc_corpus["tok"]
    ids = list(tok.special_ids.values())
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for t, i in tok.special_ids.items():
        assert tok.piece(i) == t and tok.sp.is_control(i)
    special = set(ids)
    for text in TEXTS + list(SPECIAL_TOKENS):
        assert not special & set(tok.encode(text)), text  # text never produces a special id


def assert_round_trips(tok):
    rng = random.Random(0)
    alphabet = "abcXYZ019 \t\n.,;:'\"{}[]()<|>ü漢🙂\u00a0\u200b\u2581"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.sp.unk_id() not in ids


def test_round_trip_is_exact_and_never_unknown(calc_corpus):
    assert calc_corpus["tok"].presplit  # train()'s default
    assert_round_trips(calc_corpus["tok"])


def test_train_cli_and_vocab(tmp_path, calc_corpus):
    """The CLI trains presplit by default (--presplit still parses); --no-presplit gives plain BPE,
    which still round-trips exactly."""
    for flags, presplit in (([], True), (["--presplit"], True), (["--no-presplit"], False)):
        out = str(tmp_path / f"tok{len(flags)}{presplit}")
        tokenizer.main(["train", calc_corpus["jsonl"], "--out", out, "--vocab-size", "450", *flags])
        tok = Tokenizer(out + ".model")
        assert tok.presplit == presplit, flags
        assert 300 < tok.vocab_size <= 450
    assert_round_trips(tok)  # the plain one
    with pytest.raises(ValueError, match="at least"):
        tokenizer.train([calc_corpus["jsonl"]], out, vocab_size=100)


def llama_style_model(tmp_path) -> str:
    """A stand-in for a Llama-2 / Mistral tokenizer.model: dummy prefix, <s> </s>, byte fallback."""
    words = "the a model of tokens data learning in to and is for on with as by".split()
    rng = random.Random(1)
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=320, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   add_dummy_prefix=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    path = str(tmp_path / "llama.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def test_extend_existing_model(tmp_path, calc_corpus):
    base_path = llama_style_model(tmp_path)
    base = spm.SentencePieceProcessor(model_file=base_path)
    with pytest.raises(ValueError, match="lacks the agentc special tokens.*extend"):
        Tokenizer(base_path)
    out = str(tmp_path / "llama-agentc.model")
    tokenizer.main(["extend", base_path, out])
    tok = Tokenizer(out)
    assert not tok.presplit  # a pretrained tokenizer encodes as it was trained
    n = base.get_piece_size()
    assert tok.vocab_size == n + len(SPECIAL_TOKENS)
    assert sorted(tok.special_ids.values()) == list(range(n, n + len(SPECIAL_TOKENS)))
    for text in TEXTS:  # old ids keep their meaning: pretrained embeddings stay valid
        if "\u2581" not in text:  # (the base model turns a literal U+2581 into a space)
            assert tok.encode(text) == base.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tokenizer.extend(out, str(tmp_path / "again.model")) == []  # idempotent
    # the layout works with the dummy-prefix tokenizer too
    rec = {"messages": [{"role": "user", "content": " the model"}, {"role": "assistant", "content": "data "}]}
    assert unrender(render(rec, tok).ids, tok) == rec["messages"]


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        Tokenizer("/nonexistent/tok.model")


def test_presplit_keeps_identifiers_the_same_tokens_in_every_context(sql_corpus):
    """A presplit tokenizer (the default) keeps the tokens of a name copied from an observation
    into a call or a query."""
    tok = sql_corpus["tok"]
    assert tok.presplit
    name = tok.encode("order_lines")
    for context in ("buyers order_lines sales", '{"table": "order_lines"}', "FROM order_lines o",
                    "SELECT o.order_lines, x", "  order_lines INTEGER", "(order_lines)"):
        ids = tok.encode(context)
        assert any(ids[i:i + len(name)] == name for i in range(len(ids))), (context, [tok.piece(i) for i in ids])
        assert tok.decode(ids) == context


@pytest.mark.parametrize("marker,kind", [("<|spell:rare-words-v1|>", "spell"), ("<|glue:word-spaces-v1|>", "glue")])
def test_removed_tokenizer_kinds_are_refused(calc_corpus, tmp_path, marker, kind):
    """A model made by the removed `train --presplit --spell` / `--glue` (it carries their control
    piece) is refused by name, pointing to the git tag that still has that code."""
    with open(calc_corpus["tokenizer"], "rb") as f:
        proto = sp_pb2.ModelProto.FromString(f.read())
    proto.pieces.append(sp_pb2.ModelProto.SentencePiece(piece=marker, type=sp_pb2.ModelProto.SentencePiece.CONTROL))
    path = tmp_path / f"{kind}.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError) as e:
        tokenizer.load_tokenizer(str(path))
    msg = str(e.value)
    assert str(path) in msg and f"--{kind}" in msg and "removed" in msg and "experiments-2026-12" in msg
