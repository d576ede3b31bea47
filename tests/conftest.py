"""Shared fixtures: a small corpus of trajectories and a tokenizer trained on it, built once."""

import pytest

from data import generate, tokenizer


@pytest.fixture(scope="session")
def calc_corpus(tmp_path_factory):
    """120 trajectories of the tiny test workflow and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("calc")
    out = str(d / "train.jsonl")
    generate.main(["--workflow", "tests.fake_workflow", "--split", "train", "--n", "120", "--out", out,
                   "--workers", "1", "--quiet"])
    tok_path = tokenizer.train([out], str(d / "tok"), vocab_size=420)
    return {"dir": d, "jsonl": out, "tokenizer": tok_path, "tok": tokenizer.Tokenizer(tok_path)}
