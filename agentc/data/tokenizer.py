"""sentencepiece tokenizer with agentc's special tokens.

Special tokens are sentencepiece CONTROL pieces: each is one id, and encode() never produces one
from text, so an observation that happens to contain "<|end|>" cannot end an episode. data/format.py
places them by id. Byte fallback means no text is ever <unk>.

Our own tokenizer is trained with an identity normaliser, no dummy prefix and no whitespace
folding, so decode(encode(text)) == text for every string (tables, code and indentation survive).
The one character sentencepiece cannot carry as text is its own space marker U+2581 "▁" (it
decodes as a space); encode() writes it as its three byte-fallback pieces instead.

`train` splits text into words before sentencepiece sees it (presplit, the default): an
identifier, a digit, a run of whitespace or a run of punctuation is encoded on its own, in training
and in encode(). So a name is the same tokens wherever it appears: `order_lines` in a list_tables
observation, in `{"table": "order_lines"}` and in `FROM order_lines o` (without the split, BPE
merges it with its neighbours into `▁"order_lines"}}`, `.order_lines`, `▁order_lines`: different
tokens a small model must learn to equate before it can copy a name from an observation into a
call). The price is tokens: whitespace becomes its own piece, so trajectories are longer. A model
trained this way carries the control piece PRESPLIT, which switches the split on in encode();
a model without it (`train --no-presplit`, extended Llama-style tokenizers) is plain BPE over whole
lines.

    python -m agentc.data.tokenizer train --vocab-size 8192 --out data/sql/tok data/sql/train.jsonl
    python -m agentc.data.tokenizer extend llama2/tokenizer.model data/llama2-agentc.model
    python -m agentc.data.tokenizer encode data/sql/tok.model "SELECT name FROM customers"
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from agentc.data.format import SPECIAL_TOKENS, dump_json
from agentc.util import ArgumentParser, run_main, write_bytes

SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol
PRESPLIT = "<|presplit:words-v1|>"  # marks a model trained on WORDS chunks (see the module docstring)
# Control pieces of removed tokenizer kinds (rare words spelled letter by letter; identifiers
# carrying their word start): kept only so that Tokenizer() refuses such a model by name.
REMOVED_KINDS = {"<|spell:rare-words-v1|>": "spell", "<|glue:word-spaces-v1|>": "glue"}
REMOVED_TAG = "experiments-2026-12"
WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]|\s+|[^\sA-Za-z0-9_]+")  # covers every character


def words(text: str) -> list[str]:
    return WORDS.findall(text)


class Tokenizer:
    """The small interface data/format.py and the runtime need: encode, decode, special_ids,
    vocab_size. A byte-level BPE tokenizer for GGUF checkpoints will offer the same."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            blob = f.read()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=blob)
        except RuntimeError:  # sentencepiece says only that the bytes do not parse
            raise ValueError(f"{path}: not a sentencepiece model (empty, truncated or another kind of file)") from None
        removed = [kind for piece, kind in REMOVED_KINDS.items() if self.sp.piece_to_id(piece) != self.sp.unk_id()]
        if removed:
            flags = " ".join(f"--{k}" for k in removed)
            raise ValueError(f"{path} is a `train --presplit {flags}` tokenizer; that kind of tokenizer was "
                             f"removed from agentc and lives in the git tag {REMOVED_TAG} (use that checkout "
                             "for it, or train a new tokenizer with `python -m agentc.data.tokenizer train`)")
        missing = [t for t in SPECIAL_TOKENS if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"{path} lacks the agentc special tokens {missing}; add them with "
                             f"`python -m agentc.data.tokenizer extend {path} OUT.model`")
        self.special_ids = {t: self.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        not_control = [t for t, i in self.special_ids.items() if not self.sp.is_control(i)]
        if not_control:
            raise ValueError(f"{path}: special tokens {not_control} are not CONTROL pieces, so plain text "
                             "could produce them; rebuild the tokenizer with agentc.data.tokenizer")
        self.vocab_size = self.sp.get_piece_size()
        proto = sp_pb2.ModelProto.FromString(blob)
        norm = proto.normalizer_spec
        if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
            print(f"warning: {path} normalises text ({norm.name}, remove_extra_whitespaces="
                  f"{norm.remove_extra_whitespaces}); decode(encode(x)) may differ from x", file=sys.stderr)
        # Text after a literal U+2581 continues a segment, so it must not get a dummy prefix.
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self._mark_ids = byte_ids if self.sp.unk_id() not in byte_ids else None
        self.presplit = self.sp.piece_to_id(PRESPLIT) != self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        if not self.presplit:
            return self._encode(text)
        chunks = words(text)
        if SPACE_MARK in text:
            pieces = [self._encode(c) for c in chunks]
        else:
            pieces = self.sp.encode(chunks)  # one call into C++ for all chunks
        return [i for ids in pieces for i in ids]

    def _encode(self, text: str) -> list[int]:
        if SPACE_MARK not in text or self._mark_ids is None:
            return self.sp.encode(text)
        first, *rest = text.split(SPACE_MARK)
        ids = self.sp.encode(first)
        for part in rest:
            ids += self._mark_ids + (self._sp_cont.encode(part) if part else [])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def unsampled_ids(self) -> list[int]:
        """Ids that are not text: control pieces (our special tokens, PRESPLIT) and <unk>."""
        return [i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)]

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def write_gguf_metadata(self, writer) -> None:
        gguf_metadata(self, writer)


def load_tokenizer(path: str):
    """A sentencepiece model (`.model`) or a byte-level BPE file (`.bpe.json`, data/bpe.py): both
    offer the interface above, so data/format.py, agentc.data.pack and the runtime take either."""
    if path.endswith(".bpe.json"):
        from agentc.data.bpe import BPETokenizer
        return BPETokenizer(path)
    return Tokenizer(path)


MIN_VOCAB_SIZE = 256 + 1 + len(SPECIAL_TOKENS) + 2  # byte pieces, <unk>, specials, PRESPLIT, one learned piece
AGENT_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.bpe.json")  # what a compiled agent carries


def agent_tokenizer_name(path: str) -> str:
    """The file name a compiled agent gives the tokenizer at `path`."""
    return "tokenizer.bpe.json" if path.endswith(".bpe.json") else "tokenizer.model"


def gguf_metadata(tok: Tokenizer, writer) -> None:
    """tokenizer.ggml.* fields for a GGUF export of a model with our sentencepiece tokenizer
    (llama.cpp's "llama" tokenizer: pieces, scores, types). llama.cpp knows nothing of PRESPLIT,
    so a presplit model reads text split differently there."""
    if tok.presplit:
        print(f"warning: {tok.path} splits words before encoding (presplit); llama.cpp will not", file=sys.stderr)
    sp = tok.sp
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(tok.vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(tok.vocab_size)])
    writer.add_token_scores([sp.get_score(i) for i in range(tok.vocab_size)])
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)


# ----------------------------------------------------------------------------- training

def corpus_lines(paths: Iterable[str], presplit: bool = True) -> Iterator[str]:
    """Every text a trajectory renders (contents, reasoning, call JSON, observations), one line at
    a time: sentencepiece treats each input as a sentence, and newlines become byte pieces.
    ValueError naming FILE:LINE for a line that is not a trajectory."""
    for path in paths:
        lineno = 0
        with open(path, encoding="utf-8") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    try:
                        texts = _record_texts(record)
                    except (ValueError, TypeError, AttributeError):
                        raise ValueError(f"{path}:{lineno}: not a trajectory (a JSON object with a list of chat "
                                         "messages, tool-call arguments in JSON)") from None
                    for text in texts:
                        lines = (s for s in text.split("\n") if s)
                        # what Tokenizer.encode will see: chunk by chunk, or whole lines
                        yield from (w for s in lines for w in words(s)) if presplit else lines
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def _record_texts(record: dict) -> list[str]:
    """The texts of a trajectory record; TypeError, AttributeError or ValueError when it is not one."""
    messages = record.get("messages", [])
    if not isinstance(messages, list):
        raise TypeError(messages)
    texts = []
    for m in messages:
        texts += [m.get("content"), m.get("reasoning")]
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", {})
            args = fn.get("arguments")
            args = json.loads(args) if isinstance(args, str) and args.strip() else args or {}
            texts.append(dump_json({"name": fn.get("name"), "arguments": args}))
    return [t for t in texts if isinstance(t, str)]


def train(paths: Sequence[str], out_prefix: str, vocab_size: int = 8192,
          max_sentences: int = 20_000_000, threads: int | None = None, presplit: bool = True) -> str:
    """Train a BPE model on trajectory JSONL files; writes OUT.model and OUT.vocab. presplit:
    words first, so a name is the same tokens in every context (see the module docstring);
    False gives plain BPE over whole lines."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte pieces, <unk>, the specials)")
    bad = []  # sentencepiece turns an error of the iterator into its own RuntimeError: keep ours

    def lines():
        try:
            yield from corpus_lines(paths, presplit)
        except ValueError as e:
            bad.append(e)
            raise
    it = lines()
    first = next(it, None)  # sentencepiece fails on an empty corpus with an internal error
    if first is None:
        raise ValueError(f"{', '.join(paths)}: no text to train on (no trajectory with a message)")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    try:
        _train_sentencepiece(itertools.chain([first], it), out_prefix, vocab_size, max_sentences, threads, presplit)
    except RuntimeError:
        if bad:
            raise bad[0] from None
        raise
    return out_prefix + ".model"


def _train_sentencepiece(sentences: Iterator[str], out_prefix: str, vocab_size: int, max_sentences: int,
                         threads: int | None, presplit: bool) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=out_prefix, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False,  # a tiny corpus gives a smaller vocab, not an error
        byte_fallback=True, character_coverage=0.9999, split_digits=True,
        control_symbols=list(SPECIAL_TOKENS) + [PRESPLIT] * presplit,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384,
        split_by_unicode_script=False,  # lets identifiers such as "_id" and "'}}" merge
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=threads or os.cpu_count() or 1, minloglevel=2)


def extend(base_path: str, out_path: str) -> list[int]:
    """Copy an existing sentencepiece model (Llama-2 / Mistral style) with our special tokens
    appended as CONTROL pieces. Existing ids, and so the pretrained embeddings, keep their
    meaning; returns the new ids (the model's embedding grows to cover them)."""
    with open(base_path, "rb") as f:
        blob = f.read()
    try:
        proto = sp_pb2.ModelProto.FromString(blob)
    except Exception:  # protobuf's DecodeError: the bytes are not a ModelProto
        proto = None
    if proto is None or not proto.pieces:
        raise ValueError(f"{base_path}: not a sentencepiece model (empty, truncated or another kind of file)")
    pieces = {p.piece: (i, p.type) for i, p in enumerate(proto.pieces)}
    new_ids = []
    for t in SPECIAL_TOKENS:
        if t in pieces:
            if pieces[t][1] != sp_pb2.ModelProto.SentencePiece.CONTROL:
                raise ValueError(f"{base_path} already has {t} as a non-control piece")
            continue
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(
            piece=t, score=0.0, type=sp_pb2.ModelProto.SentencePiece.CONTROL))
        new_ids.append(len(proto.pieces) - 1)
    write_bytes(out_path, proto.SerializeToString())
    return new_ids


def main(argv: Sequence[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m agentc.data.tokenizer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on trajectory JSONL files")
    t.add_argument("inputs", nargs="+", help="trajectory .jsonl files")
    t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size (default 8192)")
    t.add_argument("--max-sentences", type=int, default=20_000_000, help="sample at most this many lines")
    t.add_argument("--presplit", action=argparse.BooleanOptionalAction, default=True,
                   help="split into words first, so a name is the same tokens in every context (default; "
                   "costs tokens: whitespace becomes its own piece); --no-presplit: plain BPE over whole lines")
    e = sub.add_parser("extend", help="add the agentc special tokens to an existing sentencepiece model")
    e.add_argument("base", help="existing tokenizer.model")
    e.add_argument("out", help="where to write the extended model")
    c = sub.add_parser("encode", help="show how a text is tokenised")
    c.add_argument("model")
    c.add_argument("text")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        for p in args.inputs:
            if not os.path.isfile(p):
                ap.error(f"{p}: {'a directory, not a file' if os.path.isdir(p) else 'no such file'}")
        if args.vocab_size < MIN_VOCAB_SIZE:
            ap.error(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte pieces, <unk>, the specials), "
                     f"got {args.vocab_size}")
        ap.check_ranges(args, at_least={"max_sentences": 1})
        t0 = time.time()
        path = train(args.inputs, args.out, args.vocab_size, args.max_sentences, presplit=args.presplit)
        tok = Tokenizer(path)
        print(f"wrote {path}: {tok.vocab_size} pieces ({len(SPECIAL_TOKENS)} special) in {time.time() - t0:.1f}s")
    elif args.cmd == "extend":
        new = extend(args.base, args.out)
        tok = Tokenizer(args.out)
        print(f"wrote {args.out}: {tok.vocab_size} pieces, {len(new)} added "
              f"(ids {new[0] if new else '-'}..{new[-1] if new else '-'})")
    else:
        tok = Tokenizer(args.model)
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens:", " ".join(f"{tok.piece(i)}({i})" for i in ids))


if __name__ == "__main__":
    run_main(main, "agentc.data.tokenizer")
