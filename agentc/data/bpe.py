"""Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2...) behind data/tokenizer.py's
interface, built from a GGUF file's metadata with the `tokenizers` library.

A GGUF carries its tokenizer as metadata: `tokenizer.ggml.tokens` (the vocabulary in id order),
`tokenizer.ggml.merges` ("a b" pairs, best first), `tokenizer.ggml.token_type` (1 normal,
3 control...), the special ids, and `tokenizer.ggml.pre`, the name of the rule that cuts text into
words before the merges run (PRE_TOKENIZERS below). Our special tokens (data/format.py) are
appended after the checkpoint's vocabulary as new ids; the model's embedding grows to match
(model/checkpoint.resize_vocab: new rows start at the mean embedding).

No special token, the checkpoint's (`<|im_start|>`) or ours (`<|call|>`), is ever produced from
text: an observation that contains "<|end|>" is encoded as those characters. (Hugging Face's
tokenizers do turn such text into the special id; the two agree on all text without one.)

Saved as one JSON file (`*.bpe.json`: the `tokenizers` JSON plus what GGUF export needs), which a
compiled agent carries as `tokenizer.bpe.json`:

    python -m agentc.data.bpe from-gguf smollm2-135m data/smol.bpe.json
    tok = BPETokenizer("data/smol.bpe.json"); tok.encode("SELECT 1")
"""
from __future__ import annotations

import hashlib
import json
import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from agentc.data.format import SPECIAL_TOKENS
from agentc.util import ArgumentParser, run_main, write_text

FORMAT = "agentc-bpe-v1"
# GPT-2's word rule: contractions, letters, numbers, punctuation runs, whitespace not before a word
GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's: case-insensitive contractions, up to 3 digits, a leading non-letter before letters
LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str):
    """tokenizer.ggml.pre -> the `tokenizers` pre-tokenizer doing the same cut."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2 = pre_tokenizers.Split(Regex(GPT2_WORDS), behavior="isolated")
    if name in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.Sequence([gpt2, byte_level])
    if name == "smollm":  # every digit alone, then GPT-2's rule
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2, byte_level])
    if name in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_WORDS), behavior="isolated"), byte_level])
    raise ValueError(f"GGUF pre-tokenizer {name!r} is not supported (smollm, gpt2 and llama-bpe are)")


def vocab_hash(tokens: list[str]) -> str:
    """Identifies a checkpoint's vocabulary: train.py checks that the data's tokenizer extends the
    vocabulary of the GGUF it fine-tunes."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:16]


def build_from_gguf(meta: dict) -> dict:
    """Our tokenizer file's content from GGUF metadata (agentc/data/gguf_file.read_metadata)."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') "
                         "GGUF tokenizers are supported here")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if tokens[-len(SPECIAL_TOKENS):] == list(SPECIAL_TOKENS):  # a GGUF we exported: ours are already there
        tokens, types = tokens[:-len(SPECIAL_TOKENS)], types[:-len(SPECIAL_TOKENS)]
    clash = [t for t in SPECIAL_TOKENS if t in set(tokens)]
    if clash:
        raise ValueError(f"the checkpoint's vocabulary already holds {clash}")
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = _pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k in (3, 4)]
    tk.add_special_tokens(specials)
    n = tk.get_vocab_size(with_added_tokens=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tk.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(n, n + len(SPECIAL_TOKENS))):
        raise ValueError("our special tokens did not get the ids right after the checkpoint's vocabulary")
    return {"format": FORMAT, "pre": pre, "base_vocab_size": len(tokens), "base_vocab_sha256": vocab_hash(tokens),
            "token_types": types,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "chat_template": meta.get("tokenizer.chat_template"), "tokenizer": json.loads(tk.to_str())}


def write(content: dict, path: str) -> None:
    """Compact JSON without a final newline: the fingerprint is the hash of these bytes."""
    write_text(path, json.dumps(content, ensure_ascii=False))


def from_gguf(gguf_path: str, out_path: str) -> str:
    """Write the tokenizer of a GGUF file (or a known name, e.g. smollm2-135m) to out_path."""
    from agentc.data.gguf_file import open_gguf, read_metadata
    meta = read_metadata(open_gguf(gguf_path))
    try:
        content = build_from_gguf(meta)
    except KeyError as e:
        raise ValueError(f"{gguf_path}: its metadata lacks {e}") from None
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    write(content, out_path)
    return out_path


class BPETokenizer:
    """The interface of agentc.data.tokenizer.Tokenizer: encode, decode, special_ids, vocab_size,
    unsampled_ids, piece, fingerprint (presplit is a sentencepiece option: False here)."""
    presplit = False

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            blob = f.read()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        try:
            self.data = json.loads(blob)
        except ValueError:  # not JSON, or not UTF-8
            self.data = None
        if not isinstance(self.data, dict) or self.data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an agentc BPE tokenizer file ({FORMAT})")
        try:
            self.tk = HFTokenizer.from_str(json.dumps(self.data["tokenizer"]))
        except Exception as e:  # a KeyError, or the tokenizers library's own Exception
            raise ValueError(f"{path}: the tokenizer inside does not load ({type(e).__name__}: {e})") from None
        self.tk.encode_special_tokens = True  # text never becomes a special id (module docstring)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t: self.tk.token_to_id(t) for t in SPECIAL_TOKENS}
        if None in self.special_ids.values():
            raise ValueError(f"{path} lacks the agentc special tokens")
        self._special = {a.content for a in self.tk.get_added_tokens_decoder().values() if a.special}

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def unsampled_ids(self) -> list[int]:
        """Special ids (the checkpoint's control tokens and ours): never text."""
        return sorted(self.tk.token_to_id(t) for t in self._special)

    def piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def write_gguf_metadata(self, writer) -> None:
        """The tokenizer.ggml.* fields of a GGUF export: the vocabulary with ours as control tokens."""
        tokens = [self.piece(i) for i in range(self.vocab_size)]
        types = list(self.data["token_types"]) + [3] * (self.vocab_size - self.data["base_vocab_size"])
        merges = self.data["tokenizer"]["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.data["pre"])
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
            if self.data.get(key) is not None:
                add(int(self.data[key]))
        writer.add_add_bos_token(False)
        if self.data.get("chat_template"):
            writer.add_chat_template(self.data["chat_template"])


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m agentc.data.bpe", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("from-gguf", help="write the tokenizer of a GGUF file with our special tokens added")
    g.add_argument("gguf", help="a .gguf file or a known name (smollm2-135m)")
    g.add_argument("out", help="where to write it, e.g. data/smol.bpe.json")
    e = sub.add_parser("encode", help="show how a text is tokenised")
    e.add_argument("tokenizer")
    e.add_argument("text")
    args = ap.parse_args(argv)
    if args.cmd == "from-gguf":
        tok = BPETokenizer(from_gguf(args.gguf, args.out))
        print(f"wrote {args.out}: {tok.vocab_size} ids ({tok.data['base_vocab_size']} from the checkpoint, "
              f"{len(SPECIAL_TOKENS)} ours)")
    else:
        tok = BPETokenizer(args.tokenizer)
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens:", " ".join(f"{tok.piece(i)}({i})" for i in ids))


if __name__ == "__main__":
    run_main(main, "agentc.data.bpe")
