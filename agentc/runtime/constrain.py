"""Schema-constrained decoding of tool calls.

Between <|call|> and <|/call|> the model may only write what parse_model_output() accepts and the
called tool's JSON schema allows:

    {"name": NAME, "arguments": {...}}<|/call|>

NAME is one of the tools; "arguments" holds only that tool's keys (in any order, each at most once,
every required one), each value of its schema's type (enum, anyOf, arrays and their items, free
objects and arrays nested at most MAX_CALL_DEPTH deep); the spacing is dump_json's (", " and ": ",
no other whitespace), the text the model was trained on, so constrained calls stay canonical.
Enum values are written as dump_json writes them; free strings may use any JSON escape, but a
\\uXXXX surrogate must be half of a pair, so the decoded text is always valid UTF-8.

Design: a character-level pushdown automaton. A *stack* is a tuple of frames, innermost last; a
frame is a small tuple saying what may come next:

    ("lit", rest)              exactly the text `rest` (a key and its ": ", an enum value, "true")
    ("val", node)              a value of schema node `node`, not begun yet
    ("str", mode, n, acc)      inside a string: text, after a backslash, in \\uXXXX (n digits: acc)
    ("num", phase, int, n)     a number (int: no fraction or exponent), n characters so far; it
                               ends at the first character that cannot continue it
    ("obj", node, seen, phase) an object with known properties (seen: bit mask of keys written)
    ("dict", node, phase)      a free-form object;  ("arr", node, first): an array

A container frame waits in the state it resumes in once the value it pushed is done, so a finished
frame is simply popped. A choice (anyOf, an enum, which key or tool comes next) forks: a *state* is
a tuple of stacks alive in parallel, almost always one. Schemas compile to nodes in self.nodes,
referred to by index, so frames stay small hashable tuples and states are immutable. The JSON is
complete when a stack is empty, and <|/call|> is allowed exactly then.

A token is allowed when every character of its text (tok.decode([id]), computed once per grammar)
goes through the automaton. A token whose text is empty or holds "\\ufffd" (part of a UTF-8
sequence) is never allowed, nor is any special token but <|/call|>; a character the vocabulary only
has as bytes can still be written as a \\uXXXX escape.
"""
from __future__ import annotations

import bisect
import re

import torch

from agentc.data.format import CALL_END, MAX_CALL_DEPTH
from agentc.util import dump_json

State = tuple  # tuple of stacks; each stack a tuple of frames (see the module docstring)
FINISHED: State = ()  # after <|/call|>: nothing may follow
GREEDY_BLOCK = 64  # greedy checks this many best candidates one by one, then lists the allowed tokens
SAMPLE_CANDIDATES = 256  # sampling draws among the allowed tokens of this many best candidates
MAX_NUMBER_CHARS = 4300  # json.loads refuses an integer of more digits (sys.int_max_str_digits)
DIGITS, HEX = "0123456789", "0123456789abcdefABCDEF"
CONTAINERS = ("obj", "dict", "arr")
NOT_PLAIN = re.compile(r'["\\\x00-\x1f]')  # what ends or escapes a string, or is refused in it
STRING = ("str", 0, 0, 0)  # just after the opening quote
END = "end"  # a number frame's answer to a character that follows the number
# Number phases: 0 start, 1 after "-", 2 after a leading 0, 3 in the integer part, 4 after ".",
# 5 in the fraction, 6 after "e", 7 after the exponent's sign, 8 in the exponent.
NUMBER_ENDS = (2, 3, 5, 8)
NUMBER_STEPS = {"digit": {0: 3, 1: 3, 3: 3, 4: 5, 5: 5, 6: 8, 7: 8, 8: 8}, "-": {0: 1, 6: 7}, "+": {6: 7},
                ".": {2: 4, 3: 4}, "e": {2: 6, 3: 6, 5: 6}}


def _string(frame: tuple, c: str):
    """The string frame after character c; None refuses c, END closes the string."""
    _, mode, n, acc = frame
    if mode == 0:  # plain text
        if c == '"':
            return END
        if c == "\\":
            return ("str", 1, 0, 0)
        return frame if c >= " " else None  # raw control characters are not JSON
    if mode == 1:  # after a backslash
        return ("str", 2, 0, 0) if c == "u" else STRING if c in '"\\/bfnrt' else None
    if mode == 3:  # a high surrogate was written: its low half must follow as \uXXXX
        return ("str", 4, 0, 0) if c == "\\" else None
    if mode == 4:
        return ("str", 5, 0, 0) if c == "u" else None
    if c not in HEX:  # modes 2 and 5: the hex digits of \uXXXX (5: a low surrogate)
        return None
    acc, n = acc * 16 + int(c, 16), n + 1
    lo, hi = acc << 4 * (4 - n), ((acc + 1) << 4 * (4 - n)) - 1  # the code units still reachable
    ok = (lo <= 0xDFFF and hi >= 0xDC00) if mode == 5 else not (lo >= 0xDC00 and hi <= 0xDFFF)
    if not ok:
        return None
    if n < 4:
        return ("str", mode, n, acc)
    return ("str", 3, 0, 0) if mode == 2 and 0xD800 <= acc <= 0xDBFF else STRING


def _number(frame: tuple, c: str):
    """The number frame after character c; None refuses c, END: the number ended before c."""
    _, phase, integer, n = frame
    kind = "digit" if c in DIGITS else "e" if c in "eE" else c
    nxt = NUMBER_STEPS.get(kind, {}).get(phase)
    if kind == "digit" and c == "0" and phase in (0, 1):
        nxt = 2
    if integer and kind in (".", "e"):
        nxt = None
    if nxt is not None and n < MAX_NUMBER_CHARS:
        return ("num", nxt, integer, n + 1)
    return END if phase in NUMBER_ENDS else None


class CallGrammar:
    """The calls of `tools` (OpenAI tool entries, Tool.schema()) as a token-level constraint:
    start() after <|call|>, allows() / advance() per token, pick() to choose one from logits."""

    def __init__(self, tok, tools: list[dict]):
        self.end_id = tok.special_ids[CALL_END]
        banned = set(tok.special_ids.values()) | set(tok.unsampled_ids())
        texts = [None if i in banned else tok.decode([i]) for i in range(tok.vocab_size)]
        self.texts: list[str | None] = [t if t and "\ufffd" not in t else None for t in texts]
        self.plain = [t is not None and not NOT_PLAIN.search(t) for t in self.texts]  # text inside a string
        ranked = sorted((t, i) for i, t in enumerate(self.texts) if t is not None)  # a trie, flattened
        self._sorted_texts, self._sorted_ids = [t for t, _ in ranked], [i for _, i in ranked]
        self.nodes: list[tuple] = []
        self._ids: dict[tuple, int] = {}
        self.any = self._node(("any",))  # any JSON value; made an anyof below, as it refers to itself
        kinds = [("str",), ("num", False), ("lit", "true"), ("lit", "false"), ("lit", "null"),
                 ("arr", self.any), ("dict", self.any)]
        self.nodes[self.any] = ("anyof", tuple(self._node(k) for k in kinds))
        stacks, self.names = [], []
        for entry in tools:
            fn = entry["function"]
            if fn["name"] in self.names:
                raise ValueError(f"two tools are named {fn['name']!r}")
            self.names.append(fn["name"])
            args = self._compile(fn.get("parameters") or {"type": "object", "properties": {}})
            if self.nodes[args][0] not in ("obj", "dict"):
                raise ValueError(f"tool {fn['name']!r}: parameters must be an object schema")
            head = '{"name": ' + dump_json(fn["name"]) + ', "arguments": '
            stacks.append((("lit", "}"), ("val", args), ("lit", head)))
        if not stacks:
            raise ValueError("a call grammar needs at least one tool")
        self._start: State = tuple(stacks)
        self._memo_state, self._memo, self._firsts, self._in_text = None, {}, {}, False

    # ------------------------------------------------------------------ schemas -> nodes

    def _node(self, spec: tuple) -> int:
        if spec not in self._ids:
            self._ids[spec] = len(self.nodes)
            self.nodes.append(spec)
        return self._ids[spec]

    def _compile(self, s: dict) -> int:
        """The node of a JSON schema, as workflows/base.py's _json_type writes them ("description",
        "default", "title" and other annotations are ignored)."""
        if "enum" in s:
            return self._node(("anyof", tuple(self._node(("lit", dump_json(v))) for v in s["enum"])))
        if "const" in s:
            return self._node(("lit", dump_json(s["const"])))
        if "anyOf" in s or "oneOf" in s:
            return self._node(("anyof", tuple(self._compile(a) for a in s.get("anyOf", s.get("oneOf")))))
        t = s.get("type")
        if isinstance(t, list):
            return self._node(("anyof", tuple(self._compile({**s, "type": x}) for x in t)))
        if t is None:
            return self.any
        simple = {"string": ("str",), "integer": ("num", True), "number": ("num", False), "null": ("lit", "null")}
        if t in simple:
            return self._node(simple[t])
        if t == "boolean":
            return self._node(("anyof", (self._node(("lit", "true")), self._node(("lit", "false")))))
        if t == "array":
            return self._node(("arr", self._compile(s["items"]) if "items" in s else self.any))
        if t == "object" and "properties" not in s:
            return self._node(("dict", self.any))
        if t == "object":  # only the known keys, whatever additionalProperties says
            keys = tuple(s["properties"])
            missing = set(s.get("required", ())) - set(keys)
            if missing:
                raise ValueError(f"schema requires keys it does not describe: {sorted(missing)}")
            required = sum(1 << keys.index(k) for k in set(s.get("required", ())))
            return self._node(("obj", tuple(dump_json(k) + ": " for k in keys),
                               tuple(self._compile(s["properties"][k]) for k in keys), required))
        raise ValueError(f"unsupported JSON schema type {t!r}")

    # ------------------------------------------------------------------ characters

    def _begin(self, node: int, below: tuple) -> list[tuple]:
        """The ways a value of `node` can begin: frames to push on `below`, one tuple each."""
        spec = self.nodes[node]
        kind = spec[0]
        if kind == "anyof":
            return [alt for a in spec[1] for alt in self._begin(a, below)]
        if kind == "lit":
            return [(spec,)]
        if kind == "str":
            return [(STRING, ("lit", '"'))]
        if kind == "num":
            return [(("num", 0, spec[1], 0),)]
        if sum(f[0] in CONTAINERS for f in below) + 2 > MAX_CALL_DEPTH:  # +2: the call and this one
            return []
        if kind == "arr":
            return [(("arr", spec[1], True), ("lit", "["))]
        if kind == "dict":
            return [(("dict", spec[1], 0), ("lit", "{"))]
        return [(("obj", node, 0, 0), ("lit", "{"))]

    def _feed(self, stack: tuple, c: str) -> list[tuple]:
        """The stacks after character c (none: c is refused)."""
        while stack:
            top, below = stack[-1], stack[:-1]
            kind = top[0]
            if kind == "lit":
                if top[1][0] != c:
                    return []
                return [below + (("lit", top[1][1:]),)] if len(top[1]) > 1 else [below]
            if kind == "val":
                return [s for alt in self._begin(top[1], below) for s in self._feed(below + alt, c)]
            if kind == "str":
                nxt = _string(top, c)
                return [] if nxt is None else [below] if nxt is END else [below + (nxt,)]
            if kind == "num":
                nxt = _number(top, c)
                if nxt is END:  # c follows the number: the frame below reads it
                    stack = below
                    continue
                return [] if nxt is None else [below + (nxt,)]
            if kind == "arr":
                return self._array(top, below, c)
            if kind == "dict":
                return self._dict(top, below, c)
            return self._object(top, below, c)
        return []  # the JSON is complete: nothing may follow

    def _array(self, top: tuple, below: tuple, c: str) -> list[tuple]:
        _, item, first = top
        if c == "]":
            return [below]
        if first:
            return self._feed(below + (("arr", item, False), ("val", item)), c)
        return [below + (("arr", item, False), ("val", item), ("lit", " "))] if c == "," else []

    def _dict(self, top: tuple, below: tuple, c: str) -> list[tuple]:
        """Phase 0: after "{"; 1: after a value; 2: after ", ", a key must come."""
        _, value, phase = top
        if c == "}" and phase != 2:
            return [below]
        if c == "," and phase == 1:
            return [below + (("dict", value, 2), ("lit", " "))]
        if c == '"' and phase != 1:
            return [below + (("dict", value, 1), ("val", value), ("lit", ": "), STRING)]
        return []

    def _object(self, top: tuple, below: tuple, c: str) -> list[tuple]:
        """Like _dict, with keys from the schema: each once, "}" once every required one is there."""
        _, node, seen, phase = top
        _, keys, values, required = self.nodes[node]
        if c == "}" and phase != 2:
            return [below] if seen & required == required else []
        if c == "," and phase == 1:
            return [below + (("obj", node, seen, 2), ("lit", " "))] if seen != (1 << len(keys)) - 1 else []
        if phase == 1:
            return []
        return [below + (("obj", node, seen | 1 << i, 1), ("val", values[i]), ("lit", key[1:]))
                for i, key in enumerate(keys) if not seen >> i & 1 and key[0] == c]

    def _step(self, state: State, c: str) -> State:
        out = [s for stack in state for s in self._feed(stack, c)]
        return tuple(dict.fromkeys(out)) if len(out) > 1 else tuple(out)

    # ------------------------------------------------------------------ tokens

    def start(self) -> State:
        """The state right after <|call|>."""
        return self._start

    def complete(self, state: State) -> bool:
        """Whether the JSON is complete, so <|/call|> may come."""
        return any(not stack for stack in state)

    def _next(self, state: State, token_id: int) -> State | None:
        """The state after the token, None if it is not allowed. The answers for the last state
        asked about are remembered, so that allows() then advance() feeds a token once."""
        if state is not self._memo_state:
            self._memo_state, self._memo, self._firsts = state, {}, {}
            self._in_text = bool(state) and all(stack and stack[-1] == STRING for stack in state)
        nxt = self._memo.get(token_id, self._memo)  # the memo itself stands for "not computed yet"
        if nxt is self._memo:
            nxt = self._memo[token_id] = self._feed_token(state, token_id)
        return nxt

    def _feed_token(self, state: State, token_id: int) -> State | None:
        if token_id == self.end_id:
            return FINISHED if self.complete(state) else None
        text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
        if text is None:
            return None
        if self._in_text and self.plain[token_id]:  # plain text inside a string changes nothing
            return state
        if text[0] not in self._firsts:  # most refusals are of the first character: ask once each
            self._firsts[text[0]] = self._step(state, text[0])
        state = self._firsts[text[0]]
        for c in text[1:]:
            if not state:
                break
            state = self._step(state, c)
        return state or None

    def allows(self, state: State, token_id: int) -> bool:
        """Whether token_id may come next (<|/call|> only once the JSON is complete)."""
        return self._next(state, int(token_id)) is not None

    def advance(self, state: State, token_id: int) -> State:
        """The state after token_id, which must be allowed; FINISHED after <|/call|>."""
        nxt = self._next(state, int(token_id))
        if nxt is None:
            text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
            raise ValueError(f"token {token_id} ({text!r}) is not allowed here")
        return nxt

    def allowed_ids(self, state: State) -> list[int]:
        """Every token allowed next. A walk of the vocabulary's trie (token texts sorted, so those
        sharing a prefix are a range) that drops a prefix the automaton refuses: cheap where few
        tokens fit, a whole-vocabulary walk inside a string."""
        keys, out = self._sorted_texts, [self.end_id] if self.complete(state) else []
        todo = [(0, len(keys), 0, state)]  # keys[lo:hi] share a prefix of d characters: the state after it
        while todo:
            lo, hi, d, st = todo.pop()
            while lo < hi and len(keys[lo]) == d:  # the prefix itself is a token
                out.append(self._sorted_ids[lo])
                lo += 1
            while lo < hi:
                c = keys[lo][d]
                end = hi if c == "\U0010ffff" else bisect.bisect_left(keys, keys[lo][:d] + chr(ord(c) + 1), lo, hi)
                nxt = self._step(st, c)
                if nxt:
                    todo.append((lo, end, d + 1, nxt))
                lo = end
        return out

    def pick(self, state: State, logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> int:
        """The next token from `logits` (vocab,) among the allowed ones; a -inf logit is never picked.

        temperature <= 0: greedy, exact: the allowed token of highest logit. The argmax is tried
        first, then the GREEDY_BLOCK best candidates, then allowed_ids(). temperature > 0: an
        approximation: a sample from the softmax (with temperature, then top_p) renormalised over the
        allowed tokens among the SAMPLE_CANDIDATES best by logit, which hold nearly all the mass that
        sampling could reach; if none of them is allowed, the greedy choice. ValueError when no
        token is allowed."""
        logits = logits.detach().reshape(-1).float().cpu()
        if temperature <= 0:
            return self._greedy(state, logits)
        top = logits.topk(min(SAMPLE_CANDIDATES, len(logits)))
        ids = [i for i, v in zip(top.indices.tolist(), top.values.tolist())
               if v > float("-inf") and self._next(state, i) is not None]
        if not ids:
            return self._greedy(state, logits)
        probs = torch.softmax(logits[ids] / temperature, 0)  # ids are in descending logit order
        if top_p < 1.0:  # the smallest prefix whose mass reaches top_p
            probs = probs[:max(1, int((probs.cumsum(0) - probs < top_p).sum()))]
        return ids[int(torch.multinomial(probs, 1, generator=generator))]

    def _greedy(self, state: State, logits: torch.Tensor) -> int:
        value, best = logits.max(0)
        if value > float("-inf") and self.allows(state, int(best)):
            return int(best)
        top = logits.topk(min(GREEDY_BLOCK, len(logits)))
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            if v > float("-inf") and self.allows(state, i):
                return i
        ids = torch.tensor([i for i in self.allowed_ids(state) if i < len(logits)], dtype=torch.long)
        if len(ids) and logits[ids].max() > float("-inf"):
            return int(ids[logits[ids].argmax()])
        raise ValueError("no token may continue this tool call: no token of the vocabulary fits here (the "
                         f"text needs a character none has), or each that does has a -inf logit; state {state!r}")
