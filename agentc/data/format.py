"""THE token layout: the one place that knows the special tokens.

Training renders trajectories with render(); the runtime builds its token stream with the same
Transcript methods (prompt, model tokens it sampled, result) and parses what the model wrote with
parse_model_output(). One episode in tokens:

    <|begin|><|system|> system text <|user|> question <|assistant|>
        reasoning <|call|>{"name": "run_sql", "arguments": {...}}<|/call|>
        <|result|> observation <|/result|>
        reasoning <|answer|> final text <|end|>
    [<|user|> follow-up <|assistant|> ... <|end|>]

Every token carries a source and a loss weight:

    template  inserted by the runtime (<|begin|>, role markers, <|result|> ... <|/result|>)  weight 0
    user      the user's words                                                                weight 0
    tool      observations                                                                    weight 0
    model     what the policy must produce, <|call|> <|/call|> <|answer|> <|end|> included    the
              message's "weight" (default 1; 0 keeps a deliberate mistake in context untrained)
    pad       filler written by data/pack.py                                                  weight 0

Invariant (tests/test_format.py): a token with weight > 0 is a model token, and the only special
tokens a model token can be are MODEL_TOKENS, which are exactly the ones the runtime lets the model
sample; every token the runtime injects has weight 0.

Text is tokenised one segment at a time (the text between two special tokens), never across a
special token: the runtime tokenises an observation on its own, so rendering must too, or the
streams would drift apart.

Canonical trajectory (JSONL record): {"messages": [...], "tools": [...], "meta": {...}} in the
OpenAI chat format. Assistant messages have an optional "reasoning" string, "content" (the final
answer; null on a tool-call message, whose text before the call may be given in either "reasoning"
or "content"), optional "tool_calls" and an optional numeric "weight" (0, or a normal float16 as
shards store it). Tool results are {"role": "tool", "tool_call_id", "name", "content"}. Content may
also be a list of OpenAI text parts, and the first message may use the role "developer".

A record whose meta says "ends_with_calls": true (single-step function-calling data such as
xLAM's, which holds the calls a request needs but neither their results nor an answer) ends with
an assistant message whose calls have no results: the calls are rendered back to back, trained,
and nothing follows. Every other record must pair each call with its result and end in an answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from agentc.util import dump_json  # the one JSON of calls and observations, shared with the workflows

LAYOUT_VERSION = 1

PAD, BEGIN = "<|pad|>", "<|begin|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
CALL, CALL_END = "<|call|>", "<|/call|>"
RESULT, RESULT_END = "<|result|>", "<|/result|>"
ANSWER, END = "<|answer|>", "<|end|>"
# Spare ids so a later layout version can add a token without retraining every tokenizer.
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(6))
SPECIAL_TOKENS = (PAD, BEGIN, SYSTEM, USER, ASSISTANT, CALL, CALL_END, RESULT, RESULT_END,
                  ANSWER, END) + RESERVED
MODEL_TOKENS = (CALL, CALL_END, ANSWER, END)  # the special tokens the policy may sample
STOP_TOKENS = (CALL_END, END)                 # decoding stops after these

SOURCES = ("template", "user", "tool", "model", "pad")
SRC_TEMPLATE, SRC_USER, SRC_TOOL, SRC_MODEL, SRC_PAD = range(len(SOURCES))


class FormatError(ValueError):
    """A trajectory or a model output that does not follow the layout. The message names the
    record (and message index) so a bad line in a 20k-line file can be found."""


class TokenizerLike(Protocol):
    special_ids: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Rendered:
    ids: np.ndarray      # (T,) int32 token ids
    sources: np.ndarray  # (T,) uint8 index into SOURCES
    weights: np.ndarray  # (T,) float32 loss weight of each token (as a target)

    def __len__(self) -> int:
        return len(self.ids)


class Transcript:
    """Builds a token stream piece by piece. render() uses it for training data and the runtime
    uses the same methods, so both produce identical tokens for identical episodes."""

    def __init__(self, tok: TokenizerLike):
        self.tok = tok
        self.ids: list[int] = []
        self.sources: list[int] = []
        self.weights: list[float] = []

    def _add(self, ids: Sequence[int], source: int, weight: float = 0.0) -> None:
        self.ids.extend(ids)
        self.sources.extend([source] * len(ids))
        self.weights.extend([weight] * len(ids))

    def special(self, token: str, source: int = SRC_TEMPLATE, weight: float = 0.0) -> None:
        self._add([self.tok.special_ids[token]], source, weight)

    def text(self, text: str, source: int, weight: float = 0.0) -> None:
        if text:
            self._add(self.tok.encode(text), source, weight)

    # --- the pieces of the layout
    def begin(self, system: str | None) -> None:
        self.special(BEGIN)
        if system is not None:
            self.special(SYSTEM)
            self.text(system, SRC_TEMPLATE)

    def user(self, text: str) -> None:
        """A user turn; the runtime injects <|assistant|> right after it."""
        self.special(USER)
        self.text(text, SRC_USER)
        self.special(ASSISTANT)

    def call(self, reasoning: str, name: str, arguments: dict, weight: float = 1.0) -> None:
        self.text(reasoning, SRC_MODEL, weight)
        self.special(CALL, SRC_MODEL, weight)
        self.text(dump_json({"name": name, "arguments": arguments}), SRC_MODEL, weight)
        self.special(CALL_END, SRC_MODEL, weight)

    def result(self, observation: str) -> None:
        self.special(RESULT)
        self.text(observation, SRC_TOOL)
        self.special(RESULT_END)

    def answer(self, reasoning: str, text: str, weight: float = 1.0) -> None:
        self.text(reasoning, SRC_MODEL, weight)
        self.special(ANSWER, SRC_MODEL, weight)
        self.text(text, SRC_MODEL, weight)
        self.special(END, SRC_MODEL, weight)

    def sampled(self, ids: Sequence[int]) -> None:
        """Tokens the model produced at run time, as they are (the runtime's side of call/answer)."""
        self._add(ids, SRC_MODEL, 1.0)

    def rendered(self) -> Rendered:
        return Rendered(np.asarray(self.ids, np.int32), np.asarray(self.sources, np.uint8),
                        np.asarray(self.weights, np.float32))


# ----------------------------------------------------------------------------- rendering

def _record_name(record: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(record, dict) and isinstance(record.get("meta"), dict) and record["meta"].get("task_id"):
        return str(record["meta"]["task_id"])
    return "record"


def _parse_call(tc: Any, where: str) -> tuple[str, str, dict]:
    """(id, name, arguments) of one OpenAI tool_calls entry; arguments may be a JSON string (as in
    the OpenAI API) or an object."""
    if not isinstance(tc, dict) or not isinstance(tc.get("function"), dict):
        raise FormatError(f"{where}: a tool call must be {{'id', 'type': 'function', 'function': {{...}}}}")
    fn = tc["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: arguments of call to '{name}' are not valid JSON ({e.msg} at "
                              f"position {e.pos}): {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise FormatError(f"{where}: arguments of call to '{name}' must be a JSON object, got {type(args).__name__}")
    call_id = tc.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise FormatError(f"{where}: call to '{name}' has no id (tool results are matched by id)")
    return call_id, name, args


def _text_field(msg: dict, key: str, where: str, allow_none: bool = True) -> str:
    """A message's text. OpenAI also allows content as a list of {"type": "text", "text": ...}
    parts; they are joined (any other part type has no place in a token stream)."""
    value = msg.get(key)
    if value is None and allow_none:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise FormatError(f"{where}: '{key}' must be a string or a list of text parts, got {type(value).__name__}")
    return value


# Weights are stored as float16 in shards: a positive weight must be a normal float16 (no silent 0 or inf).
MIN_WEIGHT, MAX_WEIGHT = 2.0 ** -14, 65504.0


def _weight(msg: dict, where: str) -> float:
    w = msg.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w == 0 or MIN_WEIGHT <= w <= MAX_WEIGHT):
        raise FormatError(f"{where}: 'weight' must be 0 or a number in [{MIN_WEIGHT:.3g}, {MAX_WEIGHT:g}], got {w!r}")
    return float(w)


def render(record: dict, tok: TokenizerLike, name: str | None = None) -> Rendered:
    """Render one trajectory into (ids, sources, weights). Raises FormatError naming the record
    (`name`, else meta.task_id) and the message for anything that does not follow the layout."""
    rec = _record_name(record, name)
    msgs = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"{rec}: no 'messages' list")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise FormatError(f"{rec}: message {k} is not an object")
    meta = record.get("meta")
    ends_with_calls = isinstance(meta, dict) and meta.get("ends_with_calls") is True
    t = Transcript(tok)
    k, ended_with_calls = 0, False
    if msgs[0].get("role") in ("system", "developer"):  # "developer" is OpenAI's newer name for it
        t.begin(_text_field(msgs[0], "content", f"{rec}: message 0 (system)"))
        k = 1
    else:
        t.begin(None)
    expect, answers = "user", 0  # expect: who speaks next, "user" or "assistant"
    while k < len(msgs):
        m, where = msgs[k], f"{rec}: message {k}"
        role = m.get("role")
        where += f" ({role})"
        if role == "user":
            if expect == "assistant":
                raise FormatError(f"{where}: a user message where the assistant should speak")
            t.user(_text_field(m, "content", where, allow_none=False))
            expect, k = "assistant", k + 1
        elif role == "assistant":
            if expect == "user":
                raise FormatError(f"{where}: an assistant message before any user message, or after the "
                                  "final answer (expected a user message)")
            if "function_call" in m:
                raise FormatError(f"{where}: legacy 'function_call'; convert it to 'tool_calls' first")
            weight = _weight(m, where)
            reasoning = _text_field(m, "reasoning", where)
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise FormatError(f"{where}: 'tool_calls' must be a list")
            if not calls:  # the final answer of this turn
                if m.get("content") is None:
                    raise FormatError(f"{where}: an assistant message needs 'content' (its answer) or 'tool_calls'")
                t.answer(reasoning, _text_field(m, "content", where), weight)
                expect, k, answers = "user", k + 1, answers + 1
                continue
            content = _text_field(m, "content", where)
            if reasoning and content:
                raise FormatError(f"{where}: text before a tool call goes in 'reasoning' or 'content', not both")
            # The results must follow, one per call, in any order; each call is rendered followed
            # by its own result, the way the runtime executes calls one at a time.
            parsed = [_parse_call(tc, f"{where}, tool call {i}") for i, tc in enumerate(calls)]
            ids = [p[0] for p in parsed]
            if len(set(ids)) != len(ids):
                raise FormatError(f"{where}: two tool calls share an id ({ids}); results could not be matched")
            results, j = {}, k + 1
            while j < len(msgs) and msgs[j].get("role") == "tool":
                rid = msgs[j].get("tool_call_id")
                if not isinstance(rid, str) or rid not in ids:
                    raise FormatError(f"{rec}: message {j} (tool): a tool result with no matching call "
                                      f"(tool_call_id={rid!r})")
                if rid in results:
                    raise FormatError(f"{rec}: message {j} (tool): a second result for call id {rid!r}")
                results[rid] = (j, msgs[j])
                j += 1
            if ends_with_calls and not results and j == len(msgs):  # the record stops at its calls
                for i, (call_id, fname, args) in enumerate(parsed):
                    t.call((reasoning or content) if i == 0 else "", fname, args, weight)
                ended_with_calls, k = True, j
                continue
            for i, (call_id, fname, args) in enumerate(parsed):
                if call_id not in results:
                    raise FormatError(f"{where}: call to '{fname}' (id {call_id!r}) has no tool result after it")
                jj, res = results[call_id]
                if res.get("name") not in (None, fname):
                    raise FormatError(f"{rec}: message {jj} (tool): result names tool {res.get('name')!r} "
                                      f"but call {call_id!r} was to {fname!r}")
                t.call((reasoning or content) if i == 0 else "", fname, args, weight)
                t.result(_text_field(res, "content", f"{rec}: message {jj} (tool)", allow_none=False))
            expect, k = "assistant", j
        elif role == "tool":
            raise FormatError(f"{where}: a tool result with no matching call "
                              f"(tool_call_id={m.get('tool_call_id')!r})")
        elif role in ("system", "developer"):
            raise FormatError(f"{where}: a system message is only allowed first")
        else:
            raise FormatError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
    if ends_with_calls and not ended_with_calls:
        raise FormatError(f"{rec}: meta.ends_with_calls is set, but the last message is not an assistant "
                          "message with tool calls and no results")
    if not ended_with_calls and (expect != "user" or not answers):
        raise FormatError(f"{rec}: the trajectory does not end with a final answer "
                          "(an assistant message without tool_calls)")
    return t.rendered()


# ----------------------------------------------------------------------------- parsing

MAX_CALL_DEPTH = 32  # lists and objects nested in a call: real ones use a few; Python recurses on each


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (list, dict)):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


@dataclass
class ModelStep:
    """One stretch of model output, up to and including a stop token."""
    reasoning: str
    call: dict | None = None     # {"name": str, "arguments": dict}
    answer: str | None = None


def parse_model_output(ids: Sequence[int], tok: TokenizerLike) -> ModelStep:
    """Parse what the model produced since the last injected token: reasoning, then either
    <|call|> JSON <|/call|> or <|answer|> text <|end|>. Raises FormatError (an "invalid format"
    failure for the runtime) on anything else."""
    sid = tok.special_ids
    call, call_end, ans, end = sid[CALL], sid[CALL_END], sid[ANSWER], sid[END]
    allowed = {call, call_end, ans, end}
    specials = {v: k for k, v in sid.items()}
    ids = list(ids)
    positions = [(i, x) for i, x in enumerate(ids) if x in specials]
    for i, x in positions:
        if x not in allowed:
            raise FormatError(f"model output contains {specials[x]} at position {i}, which only the runtime writes")
    kinds = [x for _, x in positions]
    if kinds == [call, call_end] and positions[1][0] == len(ids) - 1:
        p = positions[0][0]
        body = tok.decode(ids[p + 1:-1])
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise FormatError(f"tool call is not valid JSON ({e.msg} at position {e.pos}): {body[:120]!r}") from None
        except RecursionError:
            raise FormatError(f"tool call JSON is nested deeper than {MAX_CALL_DEPTH} levels: {body[:120]!r}") from None
        except ValueError:  # json.loads raises no other ValueError: an integer of over 4300 digits
            raise FormatError(f"tool call holds an integer with too many digits to read: {body[:120]!r}") from None
        if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
            raise FormatError(f'tool call must be {{"name": ..., "arguments": {{...}}}}, got {body[:120]!r}')
        if not isinstance(obj["name"], str) or not isinstance(obj["arguments"], dict):
            raise FormatError(f"tool call needs a string name and an object of arguments: {body[:120]!r}")
        if _depth(obj) > MAX_CALL_DEPTH:
            raise FormatError(f"tool call JSON is nested deeper than {MAX_CALL_DEPTH} levels: {body[:120]!r}")
        try:
            dump_json(obj).encode("utf-8")
        except UnicodeEncodeError:  # "\ud800" is valid JSON, yet no text: no tokenizer or file can hold it
            raise FormatError(f"tool call escapes half a surrogate pair (\\ud800-\\udfff), which is no text: "
                              f"{body[:120]!r}") from None
        return ModelStep(tok.decode(ids[:p]), call=obj)
    if kinds == [ans, end] and positions[1][0] == len(ids) - 1:
        p = positions[0][0]
        return ModelStep(tok.decode(ids[:p]), answer=tok.decode(ids[p + 1:-1]))
    seen = " ".join(specials[x] for x in kinds) or "no special token"
    raise FormatError("model output must end with <|call|> ... <|/call|> or <|answer|> ... <|end|>; "
                      f"got {seen}")


def unrender(ids: Sequence[int], tok: TokenizerLike, weights: Sequence[float] | None = None) -> list[dict]:
    """The inverse of render() for canonical records: token ids back to OpenAI chat messages
    (call ids are numbered call_0, call_1, ... in order). With `weights`, an assistant message
    trained with a weight other than 1 gets its "weight" back."""
    sid = tok.special_ids
    specials = {v: k for k, v in sid.items()}
    ids = list(ids)
    if not ids or ids[0] != sid[BEGIN]:
        raise FormatError("a rendered trajectory starts with <|begin|>")

    def next_special(i: int, *wanted: str) -> int:
        j = i
        while j < len(ids) and ids[j] not in specials:
            j += 1
        if j == len(ids) or specials[ids[j]] not in wanted:
            got = specials[ids[j]] if j < len(ids) else "the end of the stream"
            raise FormatError(f"expected {' or '.join(wanted)} after position {i}, got {got}")
        return j

    msgs: list[dict] = []
    i, n_calls = 1, 0
    if i < len(ids) and ids[i] == sid[SYSTEM]:
        j = next_special(i + 1, USER)
        msgs.append({"role": "system", "content": tok.decode(ids[i + 1:j])})
        i = j
    while i < len(ids):
        if ids[i] != sid[USER]:
            raise FormatError(f"expected <|user|> at position {i}")
        j = next_special(i + 1, ASSISTANT)
        msgs.append({"role": "user", "content": tok.decode(ids[i + 1:j])})
        i = j + 1
        while True:  # model steps until this turn's <|end|>
            j = next_special(i, CALL, ANSWER)
            j = next_special(j + 1, CALL_END if ids[j] == sid[CALL] else END)
            step = parse_model_output(ids[i:j + 1], tok)
            msg: dict = {"role": "assistant"}
            if step.reasoning:
                msg["reasoning"] = step.reasoning
            if weights is not None and float(weights[j]) != 1.0:
                w = float(weights[j])
                msg["weight"] = int(w) if w.is_integer() else w
            if step.answer is not None:
                msg["content"] = step.answer
                msgs.append({k: msg[k] for k in ("role", "reasoning", "content", "weight") if k in msg})
                i = j + 1
                break
            call_id = f"call_{n_calls}"
            n_calls += 1
            msg["content"] = None
            msg["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": step.call["name"],
                                               "arguments": dump_json(step.call["arguments"])}}]
            msgs.append({k: msg[k] for k in ("role", "reasoning", "content", "tool_calls", "weight") if k in msg})
            if j + 1 >= len(ids) or ids[j + 1] != sid[RESULT]:
                raise FormatError(f"expected <|result|> after the call ending at position {j}")
            k = next_special(j + 2, RESULT_END)
            msgs.append({"role": "tool", "tool_call_id": call_id, "name": step.call["name"],
                         "content": tok.decode(ids[j + 2:k])})
            i = k + 1
    return msgs
