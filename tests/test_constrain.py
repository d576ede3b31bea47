"""Schema-constrained decoding of tool calls (agentc/runtime/constrain.py): every real call of every
workflow is accepted token by token; random walks only ever produce valid calls; wrong names,
types, enum values, spacing and early or late <|/call|> are refused; pick() is exact when greedy
and reproducible when sampling."""
import json
from typing import Literal, Optional

import jsonschema
import pytest
import torch

from agentc.data.format import (CALL, CALL_END, MAX_CALL_DEPTH, SPECIAL_TOKENS, FormatError, Transcript,
                                parse_model_output, render)
from agentc.runtime.constrain import FINISHED, CallGrammar
from agentc.util import dump_json
from agentc.workflows.base import Environment, load_workflow, run_teacher, task_seed, tool

WORKFLOWS = ("sql", "shop", "files", "support", "code")


class DemoEnv(Environment):
    @tool
    def plot(self, n: int, scale: float, mode: Literal["fast", "slow", 3, True], tags: list[str], extra: dict,
             raw: list, note: Optional[str] = None, limit: int | None = 5, flag: bool = False) -> str:
        """Every kind of parameter a workflow tool can have.

        Args:
            n: An integer.
            scale: A number.
            mode: An enum of mixed types.
            tags: Strings.
            extra: A free-form object.
            raw: A free-form array.
            note: An optional string.
            limit: An optional integer.
            flag: A boolean.
        """
        return ""

    @tool
    def ping(self) -> str:
        """No arguments."""
        return ""


DEMO = [t.schema() for t in DemoEnv().tools()]


def workflow_tools(name: str) -> list[dict]:
    wf = load_workflow(name)
    env = wf.make_env(wf.sample_task("test", 0, 0))
    try:
        return [t.schema() for t in env.tools()]
    finally:
        env.close()


@pytest.fixture(scope="module")
def all_tools():
    return [t for name in WORKFLOWS for t in workflow_tools(name)] + DEMO


def validators(tools):
    return {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"]) for t in tools}


def is_valid_call(body: str, tools) -> bool:
    obj = json.loads(body)
    v = validators(tools).get(obj["name"])
    return set(obj) == {"name", "arguments"} and v is not None and v.is_valid(obj["arguments"])


class CharTok:
    """A tokenizer whose pieces are single characters (so tests can feed text character by
    character) plus multi-character pieces that span JSON syntax, and one partial-UTF-8 piece."""
    MULTI = ['", "', '": "', '": ', '"}}', '"}', ', "', '{"', '}}', "name", "arguments", "\ufffd", ""]

    def __init__(self, chars: str | None = None):
        chars = chars if chars is not None else "".join(map(chr, range(32, 127))) + "\n\té🙂"
        self.pieces = list(SPECIAL_TOKENS) + list(chars) + self.MULTI
        self.special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = len(self.pieces)
        self.index = {p: i for i, p in enumerate(self.pieces) if p not in self.special_ids and len(p) == 1}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if i >= len(SPECIAL_TOKENS))

    def unsampled_ids(self):
        return list(self.special_ids.values())

    def piece(self, i):
        return self.pieces[i]

    def chars(self, text):
        return [self.index[c] for c in text]


def feed(g, tok, text, state=None):
    """Feed `text` one character at a time: (state, None) if every character is allowed, else
    (the state before it, the index of the first refused character)."""
    state = g.start() if state is None else state
    for k, i in enumerate(tok.chars(text)):
        if not g.allows(state, i):
            return state, k
        state = g.advance(state, i)
    return state, None


def refused_at(g, tok, text):
    return feed(g, tok, text)[1]


# ----------------------------------------------------------------------------- real calls


def call_spans(ids, tok):
    """The token ids after each <|call|> up to and including its <|/call|>."""
    call, end = tok.special_ids[CALL], tok.special_ids[CALL_END]
    ids, out = list(ids), []
    for p, x in enumerate(ids):
        if x == call:
            out.append(ids[p + 1:ids.index(end, p) + 1])
    return out


def walk(g, ids):
    """True if the grammar takes ids (a call's tokens through <|/call|>) one by one, <|/call|>
    never offered before the last token; False at the first refused token."""
    state = g.start()
    for k, i in enumerate(ids):
        if not g.allows(state, i):
            return False
        if k < len(ids) - 1:
            assert not g.allows(state, g.end_id), "<|/call|> allowed before the JSON is complete"
        state = g.advance(state, i)
    assert state == FINISHED
    return True


def test_every_real_call_is_accepted_and_every_wrong_one_refused(sql_corpus):
    tok = sql_corpus["tok"]
    records = [json.loads(line) for line in open(sql_corpus["jsonl"])]
    for name in WORKFLOWS[1:]:  # more workflows, with deliberate mistakes and transient faults
        wf = load_workflow(name, mistake_rate=0.5, fault_rate=0.2)
        for i in range(3 if name == "code" else 8):
            ep = run_teacher(wf, wf.sample_task("train", i, task_seed(1, name, "train", i)))
            if ep.failure is None:
                records.append({"messages": ep.messages, "tools": ep.tools})
    grammars, seen, accepted, skipped, corrupted = {}, set(), 0, 0, 0
    for rec in records:
        key = json.dumps(rec["tools"], sort_keys=True)
        if key not in grammars:
            grammars[key] = CallGrammar(tok, rec["tools"])
        g = grammars[key]
        for ids in call_spans(render(rec, tok).ids, tok):
            body = tok.decode(ids[:-1])
            if any(g.texts[i] is None for i in ids[:-1]):
                skipped += 1  # a piece that is part of a UTF-8 character is never allowed
                continue
            ok = walk(g, ids)
            assert ok == is_valid_call(body, rec["tools"]), body
            accepted += ok
            seen.add(json.loads(body)["name"])
            if ok and accepted % 4 == 0:  # broken copies of the call are refused
                for name, args in corruptions(json.loads(body), rec["tools"]):
                    assert not is_valid_call(dump_json({"name": name, "arguments": args}), rec["tools"])
                    assert not walk(g, call_ids(tok, name, args)), (name, args)
                    corrupted += 1
    assert accepted >= 300 and corrupted >= 150 and skipped <= accepted // 100, (accepted, corrupted, skipped)
    assert len(seen) >= 15  # tools of every workflow


def call_ids(tok, name, args):
    """The tokens of a call after <|call|>, as training data renders them."""
    t = Transcript(tok)
    t.call("", name, args)
    return t.ids[1:]


def corruptions(call, tools):
    """Invalid versions of a valid call: an unknown name, an unknown key, a missing required key, a
    value of another type."""
    name, args = call["name"], call["arguments"]
    params = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
    yield name + "x", args
    yield name, {**args, "zzz": 1}
    for k in params["required"]:
        yield name, {a: v for a, v in args.items() if a != k}
    for k, v in args.items():
        yield name, {**args, k: [v]}


def test_multi_character_tokens_and_unicode():
    tok = CharTok()
    g = CallGrammar(tok, DEMO)
    text = '{"name": "plot", "arguments": {"tags": ["é🙂", "a\\"b\\\\\\n\\u00e9\\ud83d\\ude42"], "n": -0, ' \
           '"scale": 1.5e-3, "mode": true, "extra": {"k": [null, {}, [], 1.0, "x"]}, "raw": [], "note": null}}'
    assert is_valid_call(text, DEMO)
    state, bad = feed(g, tok, text)
    assert bad is None and g.complete(state)
    greedy = [tok.pieces.index(p) for p in ['{"', "name", '": "']]  # pieces spanning several syntax elements
    s = g.start()
    for i in greedy:
        s = g.advance(s, i)
    _, bad = feed(g, tok, 'ping", "arguments": {}}', s)
    assert bad is None
    for p in ("\ufffd", ""):  # partial UTF-8 and empty pieces are never allowed
        assert not g.allows(s, tok.pieces.index(p))


# ----------------------------------------------------------------------------- rejections


def test_refusals():
    tok = CharTok()
    g = CallGrammar(tok, DEMO + workflow_tools("sql"))
    head = '{"name": "plot", "arguments": {'
    base = head + '"n": 1, "scale": 2, "mode": "fast", "tags": [], "extra": {}, "raw": []'
    assert feed(g, tok, base + "}}")[1] is None
    cases = [  # (a prefix that is allowed, what comes next: its first character is refused)
        ('{"name": "run_sq', 'x"'),                  # an unknown tool name
        ('{"name": "d', "rop_table"),
        ('{"name": "run_sql", "arguments": {', "}"),  # the required "query" missing
        (head + '"n": 1', "}"),                      # required keys missing
        (head + '"n": ', '"1"'),                      # a string where an integer is required
        (head + '"n": 1', ".5"),                     # a fraction or exponent for an integer
        (head + '"n": 1', "e3"),
        (head + '"n": 0', "1"),                      # a leading zero
        (head + '"mode": "', 'medium"'),              # outside the enum
        (head + '"mode": ', "4"),
        (head + '"mode": ', "false"),
        (head + '"flag": ', '"yes"'),
        (head + '"tags": [', "1]"),                  # an item of the wrong type
        (head + '"', 'bogus": 1'),                    # an unknown key
        (head + '"n": 1, "n', '": 2'),                # a key twice
        (head + '"note": "\\ud800', "x"),            # half a surrogate pair
        (head + '"note": "\\ud', "c00"),          # a lone low surrogate (all of \udcXX)
        (head + '"note": "a', "\nb"),                # a raw control character in a string
        (head + '"note": "\\', "x"),                 # an unknown escape
        ("{", ' "name"'),                            # whitespace other than dump_json's
        ('{"name":', '"plot"'),
        (head + '"n"', " : 1"),
        (head + '"n": 1', " ,"),
        (head + '"n": 1,', '"scale"'),
        (head + '"raw": [1,', "2]"),
        (base + "}}", "}"),                          # anything after the JSON
        (base + "}}", " "),
        (base + "}}", "{"),
    ]
    for ok, bad in cases:
        assert refused_at(g, tok, ok + bad) == len(ok), ok + bad
    state = g.start()  # <|/call|> only once the JSON is complete
    for k, i in enumerate(tok.chars(base + "}}")):
        assert not g.allows(state, g.end_id), k
        state = g.advance(state, i)
    assert g.allows(state, g.end_id) and g.advance(state, g.end_id) == FINISHED
    assert not any(g.allows(FINISHED, i) for i in range(tok.vocab_size))
    for t, i in tok.special_ids.items():  # no other special token, anywhere
        assert t == CALL_END or not g.allows(g.start(), i)
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(g.start(), tok.index["x"])


def test_nesting_depth_matches_the_parser():
    tok = CharTok()
    g = CallGrammar(tok, DEMO)
    prefix = '{"name": "plot", "arguments": {"raw": '
    deepest = MAX_CALL_DEPTH - 2  # the call object and its arguments are two levels already
    assert refused_at(g, tok, prefix + "[" * (deepest + 1)) == len(prefix) + deepest
    text = prefix + "[" * deepest + "]" * deepest + ', "n": 1, "scale": 1, "mode": 3, "tags": [], "extra": {}}}'
    state, bad = feed(g, tok, text)
    assert bad is None and g.complete(state)
    ids = [tok.special_ids[CALL]] + tok.chars(text) + [tok.special_ids[CALL_END]]
    assert parse_model_output(ids, tok).call["name"] == "plot"
    with pytest.raises(FormatError, match="nested deeper"):
        parse_model_output(ids[:1] + tok.chars(text.replace("[", "[[", 1).replace("]", "]]", 1)) + ids[-1:], tok)


def test_no_allowed_token_is_a_clear_error():
    tok = CharTok("{}:, abcdefghijklmnopqrstuvwxyz")  # no double quote: nothing can follow "{"
    g = CallGrammar(tok, DEMO)
    s = g.advance(g.start(), tok.index["{"])
    with pytest.raises(ValueError, match="no token"):
        g.pick(s, torch.zeros(tok.vocab_size))


# ----------------------------------------------------------------------------- pick


def rollout(g, tok, gen, temperature=0.0, cap=400, check_greedy=False):
    """Pick tokens from random logits (now and then biased towards closing tokens) until <|/call|>:
    (the body text, finished?)."""
    closing = torch.tensor([1.0 if t is not None and any(c in t for c in '"}],') else 0.0 for t in g.texts])
    closing[g.end_id] = 1.0
    state, ids = g.start(), []
    for step in range(cap):
        logits = torch.randn(tok.vocab_size, generator=gen) * 3
        if torch.rand((), generator=gen) < 0.5:
            logits += 6 * closing
        i = g.pick(state, logits, temperature=temperature, top_p=0.9, generator=gen)
        assert g.allows(state, i)
        if check_greedy and step % 4 == 0:  # exact: the best allowed token, by brute force
            allowed = torch.tensor([g.allows(state, j) for j in range(tok.vocab_size)])
            assert sorted(g.allowed_ids(state)) == torch.nonzero(allowed).view(-1).tolist()
            assert i == int(torch.where(allowed, logits, -torch.inf).argmax())
        state = g.advance(state, i)
        if i == g.end_id:
            return tok.decode(ids), True
        ids.append(i)
    return tok.decode(ids), False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_walks_only_write_valid_calls(sql_corpus, all_tools, temperature):
    """Each walk's every token is allowed (rollout checks); every finished walk is a valid call."""
    tok = sql_corpus["tok"]
    gen = torch.Generator().manual_seed(0)
    finished, names, walks = 0, set(), 20 if temperature == 0 else 12
    for tools in (DEMO[:1], all_tools):  # "plot" alone: integers, enums, arrays and free objects every time
        g = CallGrammar(tok, tools)
        for n in range(walks):
            body, done = rollout(g, tok, gen, temperature, check_greedy=temperature == 0 and n < 2)
            if done:
                assert is_valid_call(body, tools), body
                finished += 1
                names.add(json.loads(body)["name"])
    assert finished >= 0.9 * 2 * walks, finished  # 90% of the walks end within 400 tokens
    assert len(names) >= 6


def test_greedy_is_exact_in_tight_spots():
    """Where few tokens fit (an escape's hex digits, a key), greedy still finds the best allowed one."""
    tok = CharTok()
    g = CallGrammar(tok, DEMO)
    gen = torch.Generator().manual_seed(1)
    for text in ['{"name": "plot", "arguments": {"note": "\\u', '{"name": "plot", "arguments": {"note": "\\ud83d',
                 '{"name": "plot", "arguments": {"n": 1', '{"name": "p']:
        state, bad = feed(g, tok, text)
        assert bad is None
        allowed = torch.tensor([g.allows(state, j) for j in range(tok.vocab_size)])
        assert sorted(g.allowed_ids(state)) == torch.nonzero(allowed).view(-1).tolist()
        for _ in range(20):
            logits = torch.randn(tok.vocab_size, generator=gen)
            assert g.pick(state, logits) == int(torch.where(allowed, logits, -torch.inf).argmax())
        if allowed.sum() > 1:  # a -inf logit is never picked
            logits[g.pick(state, logits)] = -torch.inf
            assert logits[g.pick(state, logits)] > -torch.inf
        with pytest.raises(ValueError, match="no token"):
            g.pick(state, torch.where(allowed, -torch.inf, 0.0))


def test_sampling_is_reproducible(sql_corpus, all_tools):
    tok = sql_corpus["tok"]
    g = CallGrammar(tok, all_tools)
    runs = [[rollout(g, tok, torch.Generator().manual_seed(seed), temperature=0.8) for seed in range(5)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({body for body, _ in runs[0]}) > 1


def test_sampling_follows_temperature_and_top_p():
    tok = CharTok()
    g = CallGrammar(tok, DEMO)
    state, _ = feed(g, tok, '{"name": "plot", "arguments": {"note": "')  # inside a string: most tokens fit
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(tok.vocab_size, generator=gen)
    best = g.pick(state, logits)
    draws = [g.pick(state, logits, temperature=1.0, top_p=p, generator=gen) for p in (1e-6, 1.0) for _ in range(50)]
    assert set(draws[:50]) == {best}  # a tiny top_p keeps only the best allowed token
    assert len(set(draws[50:])) > 5 and all(g.allows(state, i) for i in draws)
    cold = {g.pick(state, logits, temperature=1e-3, generator=gen) for _ in range(20)}
    assert cold == {best}
