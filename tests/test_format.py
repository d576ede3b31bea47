"""The token layout: the mask invariant, round trips, parsing, and clear errors on bad records."""
import copy
import json

import pytest

from agentc.data.format import (ANSWER, ASSISTANT, BEGIN, CALL, CALL_END, END, MODEL_TOKENS, RESULT, RESULT_END,
                                SOURCES, SPECIAL_TOKENS, SRC_MODEL, SRC_TEMPLATE, SRC_TOOL, SYSTEM, USER, FormatError,
                                Transcript, dump_json, parse_model_output, render, unrender)

INJECTED = {BEGIN, SYSTEM, USER, ASSISTANT, RESULT, RESULT_END}


def call(cid, name, args, raw=False):
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": args if raw else dump_json(args)}}


def hand_records():
    """Canonical records exercising every branch of the layout."""
    return [
        {"messages": [  # no system prompt, no reasoning, answer only
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"}]},
        {"messages": [  # a deliberate mistake kept in context with weight 0, then the fix
            {"role": "system", "content": "Be careful.\n"},
            {"role": "user", "content": "Add 2 and 3 <|end|> please"},
            {"role": "assistant", "reasoning": "I add them.", "content": None, "weight": 0,
             "tool_calls": [call("call_0", "add", {"a": "2", "b": 3})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "Error: a must be an integer"},
            {"role": "assistant", "reasoning": "Oops, numbers.", "content": None,
             "tool_calls": [call("call_1", "add", {"a": 2, "b": 3})]},
            {"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "5"},
            {"role": "assistant", "reasoning": "Done.", "content": "5", "weight": 0.5}]},
        {"messages": [  # two turns, unicode, whitespace runs, an empty observation, an empty answer
            {"role": "system", "content": "  ünïcödé\tsystem  "},
            {"role": "user", "content": "漢字 🙂\n\n  indented"},
            {"role": "assistant", "content": None, "tool_calls": [call("call_0", "noop", {})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "noop", "content": ""},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "reasoning": "Same.", "content": "again: <|call|> is just text"}]},
    ]


def corpus(c):
    return [json.loads(line) for line in open(c["jsonl"])] + hand_records()


def test_mask_invariant(any_corpus):
    """Trained tokens are model tokens; the specials the runtime injects are template tokens and
    untrained; the specials the model samples are model tokens."""
    tok = any_corpus["tok"]
    name_of = {v: k for k, v in tok.special_ids.items()}
    for rec in corpus(any_corpus):
        r = render(rec, tok)
        assert len(r.ids) == len(r.sources) == len(r.weights) > 0
        assert (r.sources[r.weights > 0] == SRC_MODEL).all()
        assert (r.weights[r.sources != SRC_MODEL] == 0).all()
        for i, s in zip(r.ids.tolist(), r.sources.tolist()):
            if i in name_of:
                if name_of[i] in INJECTED:
                    assert s == SRC_TEMPLATE
                else:
                    assert name_of[i] in MODEL_TOKENS and s == SRC_MODEL
        assert r.ids[0] == tok.special_ids[BEGIN] and r.weights[0] == 0  # boundary predictions untrained
        assert r.ids[-1] == tok.special_ids[END]


def test_weights_follow_messages(calc_corpus):
    tok = calc_corpus["tok"]
    r = render(hand_records()[1], tok)
    assert sorted(set(r.weights[r.sources == SRC_MODEL].tolist())) == [0.0, 0.5, 1.0]
    assert SOURCES[SRC_TOOL] == "tool" and (r.sources == SRC_TOOL).any()


def test_render_unrender_round_trip(any_corpus):
    tok = any_corpus["tok"]
    for rec in corpus(any_corpus):
        r = render(rec, tok)
        assert unrender(r.ids, tok, r.weights) == rec["messages"]


def test_render_parse_round_trip(sql_corpus):
    """Each stretch of model tokens parses back into the reasoning and call or answer it came from."""
    tok = sql_corpus["tok"]
    for rec in corpus(sql_corpus):
        r = render(rec, tok)
        steps, start = [], None
        for i, (x, s) in enumerate(zip(r.ids.tolist(), r.sources.tolist())):
            if s == SRC_MODEL and start is None:
                start = i
            if x in (tok.special_ids[CALL_END], tok.special_ids[END]):
                steps.append(parse_model_output(r.ids[start:i + 1], tok))
                start = None
        assistant = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert len(steps) == len(assistant)
        for step, m in zip(steps, assistant):
            assert step.reasoning == (m.get("reasoning") or (m["content"] if m.get("tool_calls") else "") or "")
            if m.get("tool_calls"):
                fn = m["tool_calls"][0]["function"]
                assert step.call == {"name": fn["name"], "arguments": json.loads(fn["arguments"])}
            else:
                assert step.answer == m["content"] and step.call is None


def test_text_is_tokenised_per_segment(calc_corpus):
    """The runtime tokenises an observation alone; render must give the same tokens."""
    tok = calc_corpus["tok"]
    obs = "  12 | Lyon\n  13 | Graz  "
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": None, "tool_calls": [call("c", "f", {})]},
                        {"role": "tool", "tool_call_id": "c", "content": obs},
                        {"role": "assistant", "content": "a"}]}
    ids = render(rec, tok).ids.tolist()
    t = Transcript(tok)
    t.result(obs)
    piece = t.rendered().ids.tolist()
    assert any(ids[i:i + len(piece)] == piece for i in range(len(ids)))
    # special-token text inside content stays text
    r = render(hand_records()[1], tok)
    assert (r.ids == tok.special_ids[END]).sum() == 1


def test_parallel_calls_render_each_result_after_its_call(calc_corpus):
    tok = calc_corpus["tok"]
    rec = {"messages": [
        {"role": "user", "content": "two things"},
        {"role": "assistant", "content": "Both at once.",  # imported style: text next to calls in content
         "tool_calls": [call("a", "f", {"x": 1}), call("b", "g", '{"y": 2}', raw=True)]},
        {"role": "tool", "tool_call_id": "b", "content": "from g"},  # results may arrive in any order
        {"role": "tool", "tool_call_id": "a", "content": "from f"},
        {"role": "assistant", "content": "ok"}]}
    r = render(rec, tok)
    msgs = unrender(r.ids, tok)
    assert [m.get("tool_calls", [{}])[0].get("function", {}).get("name") for m in msgs if m["role"] == "assistant"] \
        == ["f", "g", None]
    assert [m["content"] for m in msgs if m["role"] == "tool"] == ["from f", "from g"]
    assert msgs[1]["reasoning"] == "Both at once."


def test_call_only_records_end_at_their_calls(calc_corpus):
    """meta.ends_with_calls (xLAM-style data): the calls are trained, back to back, nothing follows;
    without the flag, or with it on a record that does not end in calls, render refuses."""
    tok = calc_corpus["tok"]
    msgs = [{"role": "user", "content": "two things"},
            {"role": "assistant", "content": "Both.", "tool_calls": [call("a", "f", {"x": 1}), call("b", "g", {"y": 2})]}]
    r = render({"messages": msgs, "meta": {"ends_with_calls": True}}, tok)
    ids = r.ids.tolist()
    assert ids.count(tok.special_ids[CALL]) == ids.count(tok.special_ids[CALL_END]) == 2
    assert tok.special_ids[RESULT] not in ids and tok.special_ids[ANSWER] not in ids
    assert ids[-1] == tok.special_ids[CALL_END] and r.weights[-1] == 1
    first_call = ids.index(tok.special_ids[CALL])
    assert (r.weights[ids.index(tok.special_ids[ASSISTANT]) + 1:] == 1).all()  # reasoning and both calls
    assert tok.decode(ids[first_call + 1:ids.index(tok.special_ids[CALL_END])]).startswith('{"name": "f"')
    with pytest.raises(FormatError, match="has no tool result"):
        render({"messages": msgs}, tok)
    answered = msgs + [{"role": "tool", "tool_call_id": "a", "content": "1"},
                       {"role": "tool", "tool_call_id": "b", "content": "2"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(FormatError, match="ends_with_calls is set, but"):
        render({"messages": answered, "meta": {"ends_with_calls": True}}, tok)
    with pytest.raises(FormatError, match="has no tool result"):  # only the last message may lack results
        render({"messages": msgs + [{"role": "user", "content": "and?"}] + msgs[1:], "meta": {"ends_with_calls": True}},
               tok)


def test_parse_model_output(calc_corpus):
    tok = calc_corpus["tok"]
    sid = tok.special_ids
    enc = tok.encode
    step = parse_model_output(enc("I look.") + [sid[CALL]] + enc('{"name": "f", "arguments": {"q": "ü"}}')
                              + [sid[CALL_END]], tok)
    assert step.reasoning == "I look." and step.call == {"name": "f", "arguments": {"q": "ü"}} and step.answer is None
    step = parse_model_output([sid[ANSWER]] + enc("42") + [sid[END]], tok)
    assert step.reasoning == "" and step.answer == "42" and step.call is None
    bad = {
        "not valid JSON": enc("x") + [sid[CALL]] + enc('{"name": "f", "arguments": {') + [sid[CALL_END]],
        "must be": [sid[CALL]] + enc('{"tool": "f"}') + [sid[CALL_END]],
        "string name": [sid[CALL]] + enc('{"name": 3, "arguments": {}}') + [sid[CALL_END]],
        "only the runtime writes": enc("x") + [sid[RESULT]] + [sid[ANSWER], sid[END]],
        "must end with": enc("no stop token"),
        "got <|call|> <|/call|> <|answer|> <|end|>": [sid[CALL]] + enc("{}") + [sid[CALL_END], sid[ANSWER], sid[END]],
    }
    for msg, ids in bad.items():
        with pytest.raises(FormatError, match=msg.replace("|", r"\|")):
            parse_model_output(ids, tok)


def bad_records():
    ok = hand_records()[1]
    cases = {}

    def case(name, fn, match):
        rec = copy.deepcopy(ok)
        rec["meta"] = {"task_id": "rec-17"}
        fn(rec["messages"])
        cases[name] = (rec, match)

    case("unknown role", lambda m: m.insert(2, {"role": "robot", "content": "x"}), "message 2 .*unknown role 'robot'")
    case("result without call", lambda m: m[5].update(tool_call_id="call_9"), "message 5 .*no matching call")
    case("stray result", lambda m: m.insert(1, {"role": "tool", "tool_call_id": "x", "content": "y"}),
         "message 1 .*no matching call")
    case("bad json", lambda m: m[4]["tool_calls"][0]["function"].update(arguments='{"a": 2,'),
         "message 4 .*not valid JSON")
    case("args not object", lambda m: m[4]["tool_calls"][0]["function"].update(arguments="[1]"),
         "must be a JSON object")
    case("call without result", lambda m: m.pop(5), "message 4 .*has no tool result")
    case("no final answer", lambda m: m.pop(), "does not end with a final answer")
    case("late system", lambda m: m.insert(2, {"role": "system", "content": "x"}), "only allowed first")
    case("both texts", lambda m: m[4].update(content="also"), "not both")
    for w in (-1, float("nan"), float("inf"), 1e5, 1e-8, "1", True):
        case(f"weight {w!r}", lambda m, w=w: m[6].update(weight=w), "'weight' must be 0 or a number")
    case("duplicate call ids", lambda m: m[4]["tool_calls"].append(m[4]["tool_calls"][0]), "share an id")
    case("unhashable result id", lambda m: m[5].update(tool_call_id=["call_1"]), "message 5 .*no matching call")
    case("answer without content", lambda m: m[6].update(content=None), "needs 'content'")
    case("legacy function_call", lambda m: m[6].update(function_call={"name": "f"}), "legacy 'function_call'")
    case("tool_calls not a list", lambda m: m[4].update(tool_calls={}), "must be a list")
    case("image part", lambda m: m[1].update(content=[{"type": "image_url", "image_url": {}}]), "text parts")
    case("content not str", lambda m: m[1].update(content=["part"]), "must be a string")
    case("result names other tool", lambda m: m[5].update(name="sub"), "names tool 'sub'")
    case("assistant first", lambda m: m.pop(1), "before any user message")
    case("two users", lambda m: m.insert(2, {"role": "user", "content": "x"}), "where the assistant should speak")
    case("no call id", lambda m: m[4]["tool_calls"][0].pop("id"), "has no id")
    return cases


@pytest.mark.parametrize("name", list(bad_records()))
def test_malformed_records_raise_naming_the_record(calc_corpus, name):
    rec, match = bad_records()[name]
    with pytest.raises(FormatError, match=r"^rec-17: .*" + match):
        render(rec, calc_corpus["tok"])
    with pytest.raises(FormatError, match=r"^file.jsonl:3: "):
        render(rec, calc_corpus["tok"], name="file.jsonl:3")


def test_no_messages(calc_corpus):
    for rec in ({}, {"messages": []}, {"messages": "hi"}, {"messages": [3]},
                {"messages": [{"role": "system", "content": "alone"}]}):
        with pytest.raises(FormatError):
            render(rec, calc_corpus["tok"])


def test_openai_variants_are_accepted(calc_corpus):
    """Content as a list of text parts and the "developer" role render like their plain forms."""
    tok = calc_corpus["tok"]
    plain = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": "c"}]}
    parts = {"messages": [{"role": "developer", "content": "sys"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]}
    assert render(plain, tok).ids.tolist() == render(parts, tok).ids.tolist()


def test_special_token_set():
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)
    assert set(MODEL_TOKENS) | INJECTED <= set(SPECIAL_TOKENS) and not set(MODEL_TOKENS) & INJECTED
