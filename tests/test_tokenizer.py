"""sentencepiece training, special tokens as single control pieces, exact round trips, extension of
an existing (Llama-2 style) model."""
import io
import random

import pytest
import sentencepiece as spm

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


def test_round_trip_is_exact_and_never_unknown(calc_corpus):
    tok = calc_corpus["tok"]
    rng = random.Random(0)
    alphabet = "abcXYZ019 \t\n.,;:'\"{}[]()<|>ü漢🙂\u00a0\u200b\u2581"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.sp.unk_id() not in ids


def test_train_cli_and_vocab(tmp_path, calc_corpus):
    out = str(tmp_path / "tok")
    tokenizer.main(["train", calc_corpus["jsonl"], "--out", out, "--vocab-size", "450"])
    tok = Tokenizer(out + ".model")
    assert 300 < tok.vocab_size <= 450
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


def test_presplit_keeps_identifiers_the_same_tokens_in_every_context(sql_corpus, tmp_path):
    """With --presplit a name copied from an observation into a call or a query keeps its tokens."""
    assert not sql_corpus["tok"].presplit
    tokenizer.main(["train", sql_corpus["jsonl"], "--out", str(tmp_path / "w"), "--vocab-size", "1500", "--presplit"])
    tok = Tokenizer(str(tmp_path / "w.model"))
    assert tok.presplit
    name = tok.encode("order_lines")
    for context in ("buyers order_lines sales", '{"table": "order_lines"}', "FROM order_lines o",
                    "SELECT o.order_lines, x", "  order_lines INTEGER", "(order_lines)"):
        ids = tok.encode(context)
        assert any(ids[i:i + len(name)] == name for i in range(len(ids))), (context, [tok.piece(i) for i in ids])
        assert tok.decode(ids) == context


def test_spell_writes_rare_words_letter_by_letter(sql_corpus, tmp_path):
    """--spell: a word that is one vocabulary piece stays one token; any other word is spelled, one
    letter per token, the same in every context; decode(encode(x)) == x still holds."""
    with pytest.raises(SystemExit):
        tokenizer.main(["train", sql_corpus["jsonl"], "--out", str(tmp_path / "s"), "--spell"])  # needs --presplit
    tokenizer.main(["train", sql_corpus["jsonl"], "--out", str(tmp_path / "s"), "--vocab-size", "1500",
                    "--presplit", "--spell"])
    tok = Tokenizer(str(tmp_path / "s.model"))
    assert tok.presplit and tok.spell
    assert [tok.piece(i) for i in tok.encode("SELECT")] == ["SELECT"]
    word = "Saltriembok"  # not a word of the corpus
    assert [tok.piece(i) for i in tok.encode(word)] == list(word)
    assert tok.encode("Zq") == [i for ch in "Zq" for i in tok.sp.encode(ch)]  # a letter never seen: its bytes
    for context in (f"city = '{word}'", f"How many live in {word}?", f'{{"q": "{word}_x"}}'):
        ids = tok.encode(context)
        assert tok.decode(ids) == context
    ids = tok.encode(f"x {word}_9 y")
    assert [tok.piece(i) for i in ids if tok.piece(i) in set(word + "_9")][:len(word) + 2] == list(word + "_9")
    for text in ("héllo ▁ wörld\n\ttabs", "ünïcödé 🙂 x", "", "a1b2 __init__"):
        assert tok.decode(tok.encode(text)) == text


def test_glue_writes_words_without_their_spaces(sql_corpus, tmp_path):
    """--glue: an identifier is the same tokens after a space, a quote or a dot, and starts with a
    word-start piece; the single space between two identifiers costs no token; decode(encode(x))
    == x for every text, names never seen included, and any id sequence decodes."""
    with pytest.raises(SystemExit):
        tokenizer.main(["train", sql_corpus["jsonl"], "--out", str(tmp_path / "g"), "--glue"])  # needs --presplit
    tokenizer.main(["train", sql_corpus["jsonl"], "--out", str(tmp_path / "g"), "--vocab-size", "1500",
                    "--presplit", "--glue"])
    tok = Tokenizer(str(tmp_path / "g.model"))
    plain = tokenizer.train([sql_corpus["jsonl"]], str(tmp_path / "p"), vocab_size=1500, presplit=True)
    plain = Tokenizer(plain)
    assert tok.glue and tok.presplit and not plain.glue
    for word in ("order_lines", "Saltriembok", "Velvet"):
        name = tok.encode(word)
        assert tok.piece(name[0]).startswith("\u2581")
        for context in (f"buyers {word} sales", f'{{"table": "{word}"}}', f"FROM {word} o", f"o.{word}, x",
                        f"  {word} INTEGER", f"({word})", f"'{word}'"):
            ids = tok.encode(context)
            assert any(ids[i:i + len(name)] == name for i in range(len(ids))), (context, [tok.piece(i) for i in ids])
            assert tok.decode(ids) == context
    prose = "How many customers from Salzburg have never placed an order"
    assert len(tok.encode(prose)) < len(plain.encode(prose)) - 8  # nine spaces between ten words: implied
    rng = random.Random(3)
    alphabet = "abcXYZQ019_ \t\n.,;:'\"{}[]()<|>ü漢🙂\u00a0\u200b\u2581"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1000)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, (text, [tok.piece(i) for i in ids])
        assert tok.sp.unk_id() not in ids
    for _ in range(200):  # whatever a model samples decodes to something, and never raises
        tok.decode([rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))])
    rec = {"messages": [{"role": "user", "content": "Count buyers in Cork"},
                        {"role": "assistant", "content": "it is 3 buyers"}]}
    assert unrender(render(rec, tok).ids, tok) == rec["messages"]
