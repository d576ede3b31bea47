"""Import trajectory data people already have into our canonical JSONL (README, "Data formats").

    python -m agentc.data.import --format openai   IN.jsonl OUT.jsonl
    python -m agentc.data.import --format hermes   IN.json  OUT.jsonl      # a JSON array works too

Formats:
    openai    {"messages": [...], "tools": [...]}: tool_calls with role "tool" results, and the
              legacy assistant "function_call" with role "function" results ("functions" for tools)
    hermes    Hermes function calling: assistant text with <tool_call>{"name", "arguments"}</tool_call>
              blocks, results in <tool_response>...</tool_response>, tools in the system prompt's
              <tools>...</tools>; "messages" (role/content) or "conversations" (from/value)
    sharegpt  ShareGPT as LLaMA-Factory reads it: "conversations" with from = human, gpt,
              function_call (a JSON call, or a list of them), observation; "system"; "tools" (JSON)
    glaive    Glaive function-calling v2: "system" ("SYSTEM: ... -" then function JSON objects) and
              "chat" (USER: / ASSISTANT: / <functioncall> {...} / FUNCTION RESPONSE: turns)
    xlam      xLAM / APIGen function calling: "query", "tools" (parameters as {name: {type,
              description, default}}), "answers" (the calls). No results or answer exist, so each
              record becomes a call-only record (meta.ends_with_calls; data/format.py): its calls
              are trained and nothing is invented after them

Every converted record is checked against the token layout (data/format.py render, without a
tokenizer); a record that is malformed or does not convert is reported with its line number and
reason, counted, listed in OUT.skipped.jsonl, and skipped: nothing is dropped silently. Text an
assistant writes before its calls becomes the call's `reasoning`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable, Iterator

from agentc.data.format import SPECIAL_TOKENS, FormatError, dump_json, render
from agentc.util import ArgumentParser


class Malformed(ValueError):
    """A record that does not convert; the message says why."""


# ----------------------------------------------------------------------------- helpers

def _call(call_id: str, name: Any, arguments: Any) -> dict:
    if not isinstance(name, str) or not name:
        raise Malformed(f"a tool call without a function name: {str(name)[:80]!r}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise Malformed(f"arguments of call to {name!r} are not JSON ({e.msg}): {arguments[:80]!r}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise Malformed(f"arguments of call to {name!r} must be an object, got {type(arguments).__name__}")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": dump_json(arguments)}}


def _assistant(text: str, calls: list[dict]) -> dict:
    """An assistant message: calls with the text as their reasoning, or the text as an answer."""
    text = (text or "").strip()
    if not calls:
        return {"role": "assistant", "content": text}
    msg = {"role": "assistant", "content": None, "tool_calls": calls}
    if text:
        msg["reasoning"] = text
    return msg


def _tools(functions: Any) -> list[dict]:
    """OpenAI `tools` entries from a list of function schemas (or of tools already)."""
    if functions is None or functions == "":
        return []
    if isinstance(functions, str):
        try:
            functions = json.loads(functions)
        except json.JSONDecodeError as e:
            raise Malformed(f"tools are not JSON ({e.msg})") from None
    if isinstance(functions, dict):
        functions = [functions]
    if not isinstance(functions, list):
        raise Malformed(f"tools must be a list, got {type(functions).__name__}")
    out = []
    for f in functions:
        if not isinstance(f, dict):
            raise Malformed(f"a tool is not an object: {str(f)[:80]!r}")
        out.append(f if f.get("type") == "function" and "function" in f else {"type": "function", "function": f})
    return out


def _json_objects(text: str) -> list:
    """Every JSON value in `text`, in order, skipping what is not JSON between them."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        i = min((p for p in (text.find("{", i), text.find("[", i)) if p >= 0), default=-1)
        if i < 0:
            return out
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        out.append(value)
        i = end


def _json_object(text: str, what: str) -> Any:
    """`text` parsed as JSON, or Malformed naming `what` (a list is returned as is)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Malformed(f"{what} that is not JSON ({e.msg}): {text[:80]!r}") from None
    if not isinstance(value, (dict, list)):
        raise Malformed(f"{what} that is not an object")
    return value


class _Calls:
    """Numbers calls and pairs results with them, in order."""

    def __init__(self):
        self.n, self.pending = 0, []

    def new(self, name: Any, arguments: Any) -> dict:
        call = _call(f"call_{self.n}", name, arguments)
        self.n += 1
        self.pending.append(call)
        return call

    def result(self, content: Any, name: str | None = None) -> dict:
        if not self.pending:
            raise Malformed("a tool result with no call before it")
        call = self.pending.pop(0)
        if not isinstance(content, str):
            content = dump_json(content)
        return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": content}


# ----------------------------------------------------------------------------- formats

def from_openai(rec: dict) -> dict:
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        raise Malformed("no 'messages' list")
    calls, out = _Calls(), []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Malformed(f"message {k} is not an object")
        role = m.get("role")
        if role == "assistant" and m.get("function_call"):  # the legacy single call
            fc = m["function_call"]
            if not isinstance(fc, dict):
                raise Malformed(f"message {k}: function_call is not an object")
            out.append(_assistant(m.get("content") or "", [calls.new(fc.get("name"), fc.get("arguments"))]))
        elif role == "function":
            out.append(calls.result(m.get("content", ""), m.get("name")))
        else:
            out.append({key: v for key, v in m.items() if key != "function_call"})
    tools = rec.get("tools") or _tools(rec.get("functions"))
    return {"messages": out, "tools": tools}


ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "tool": "tool", "function": "tool", "observation": "tool", "function_call": "function_call"}
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOL_RESPONSE = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.S)
TOOLS_BLOCK = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.S)


def _turns(rec: dict) -> list[tuple[str, str]]:
    """(role, text) of a record's "messages" (role/content) or "conversations" (from/value)."""
    msgs = rec.get("messages") if "messages" in rec else rec.get("conversations")
    if not isinstance(msgs, list) or not msgs:
        raise Malformed("no 'messages' or 'conversations' list")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Malformed(f"turn {k} is not an object")
        who = m.get("role", m.get("from"))
        text = m.get("content", m.get("value"))
        if who not in ROLES:
            raise Malformed(f"turn {k}: unknown speaker {who!r}")
        if not isinstance(text, str):
            raise Malformed(f"turn {k}: text is {type(text).__name__}, not a string")
        out.append((ROLES[who], text))
    return out


def from_hermes(rec: dict) -> dict:
    calls, out, tools = _Calls(), [], []
    for k, (role, text) in enumerate(_turns(rec)):
        responses = TOOL_RESPONSE.findall(text)
        if role == "system":
            block = TOOLS_BLOCK.search(text)
            if block:
                found = _json_objects(block.group(1))
                tools = _tools([f for v in found for f in (v if isinstance(v, list) else [v])])
            out.append({"role": "system", "content": text})
        elif role == "assistant":
            made = []
            for body in TOOL_CALL.findall(text):
                call = _json_object(body, f"turn {k}: a <tool_call>")
                if not isinstance(call, dict):
                    raise Malformed(f"turn {k}: a <tool_call> that is not an object")
                made.append(calls.new(call.get("name"), call.get("arguments", call.get("parameters"))))
            out.append(_assistant(TOOL_CALL.sub("", text), made))
        elif role == "tool" or (role == "user" and responses and calls.pending
                                and not TOOL_RESPONSE.sub("", text).strip()):
            for body in responses or [text]:
                out.append(calls.result(body))
        else:
            out.append({"role": role, "content": text})
    return {"messages": out, "tools": tools}


def from_sharegpt(rec: dict) -> dict:
    calls, out = _Calls(), []
    if isinstance(rec.get("system"), str) and rec["system"]:
        out.append({"role": "system", "content": rec["system"]})
    for k, (role, text) in enumerate(_turns(rec)):
        if role == "function_call":
            value = _json_object(text, f"turn {k}: a function_call")
            made = []
            for c in value if isinstance(value, list) else [value]:
                if not isinstance(c, dict):
                    raise Malformed(f"turn {k}: a function_call that is not an object: {str(c)[:80]!r}")
                made.append(calls.new(c.get("name"), c.get("arguments")))
            out.append(_assistant("", made))
        elif role == "tool":
            n = len(calls.pending)
            parts = None
            if n > 1:  # parallel calls: a JSON list of results, one each
                try:
                    parts = json.loads(text)
                except json.JSONDecodeError:
                    parts = None
                if not (isinstance(parts, list) and len(parts) == n):
                    raise Malformed(f"turn {k}: {n} calls but not a list of {n} results")
            for part in parts or [text]:
                out.append(calls.result(part))
        else:
            out.append({"role": role, "content": text})
    return {"messages": out, "tools": _tools(rec.get("tools"))}


GLAIVE_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):")
GLAIVE_CALL = re.compile(r"<functioncall>\s*(.*)$", re.S)


def _glaive_call(body: str, k: int) -> tuple[str, Any]:
    """{"name": "f", "arguments": '{"a": 1}'}: the arguments are a JSON object quoted in single
    quotes (not JSON), so they are cut out before the rest is parsed."""
    m = re.search(r"\"arguments\"\s*:\s*'(.*)'\s*\}\s*$", body, re.S)
    if m:
        body = body[:m.start()] + '"arguments": {}}'
    call = _json_object(body, f"turn {k}: a <functioncall>")
    if not isinstance(call, dict):
        raise Malformed(f"turn {k}: a <functioncall> that is not an object")
    return call.get("name"), (m.group(1) if m else call.get("arguments"))


def from_glaive(rec: dict) -> dict:
    system, chat = rec.get("system", ""), rec.get("chat")
    if not isinstance(chat, str) or not chat.strip():
        raise Malformed("no 'chat' text")
    out, tools = [], []
    if isinstance(system, str) and system.strip():
        system = re.sub(r"^\s*SYSTEM:\s*", "", system)
        head, sep, rest = system.partition(" -")
        tools = _tools([v for v in _json_objects(rest) if isinstance(v, dict)]) if sep else []
        out.append({"role": "system", "content": system.strip()})
    calls = _Calls()
    parts = GLAIVE_TURN.split(chat)
    if parts[0].strip():
        raise Malformed(f"text before the first turn: {parts[0].strip()[:80]!r}")
    for k in range(1, len(parts), 2):
        who, text = parts[k], parts[k + 1].replace("<|endoftext|>", "").strip()
        if who == "USER":
            out.append({"role": "user", "content": text})
        elif who == "FUNCTION RESPONSE":
            out.append(calls.result(text))
        else:
            m = GLAIVE_CALL.search(text)
            made = [calls.new(*_glaive_call(m.group(1).strip(), k // 2))] if m else []
            out.append(_assistant(text[:m.start()] if m else text, made))
    return {"messages": out, "tools": tools}


XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
              "number": "number", "bool": "boolean", "boolean": "boolean", "list": "array", "tuple": "array",
              "set": "array", "array": "array", "dict": "object", "object": "object"}


def _xlam_parameters(params: Any, where: str) -> dict:
    """xLAM describes parameters as {name: {"type": "List[int], optional", "description", "default"}};
    this makes the JSON Schema object the other formats carry. A type it cannot map keeps its
    text in the description and gets no "type"; "optional" or a default makes it not required."""
    if params in (None, {}):
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise Malformed(f"{where}: parameters must be an object")
    if params.get("type") == "object" and isinstance(params.get("properties"), dict):
        return params  # already JSON Schema
    props, required = {}, []
    for name, spec in params.items():
        if not isinstance(spec, dict):
            raise Malformed(f"{where}: parameter {name!r} is not an object")
        text = str(spec.get("type", "")).strip()
        optional = bool(re.search(r"optional\s*$", text, re.I))
        base = re.sub(r",?\s*optional\s*$", "", text, flags=re.I)
        kind = XLAM_TYPES.get(re.split(r"[\[\s]", base.lower(), maxsplit=1)[0]) if base else None
        prop = {"type": kind} if kind else {}
        desc = str(spec.get("description", "")).strip()
        if base and not kind:
            desc = f"{desc} (type: {base})".strip()
        if desc:
            prop["description"] = desc
        if "default" in spec:
            prop["default"] = spec["default"]
        props[name] = prop
        if not optional and "default" not in spec:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


def from_xlam(rec: dict) -> dict:
    """xLAM / APIGen: {"query", "tools", "answers"} (tools and answers may be JSON strings). The
    record holds the calls a request needs, not their results or a final answer, so it becomes a
    call-only record (meta.ends_with_calls, see data/format.py): the calls are trained, nothing
    follows them."""
    query = rec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise Malformed("no 'query' text")
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = _json_object(answers, "'answers'")
    if isinstance(answers, dict):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise Malformed("no calls in 'answers' (a request that needs no call has nothing to train)")
    calls = _Calls()
    made = []
    for i, a in enumerate(answers):
        if not isinstance(a, dict):
            raise Malformed(f"answer {i} is not an object")
        made.append(calls.new(a.get("name"), a.get("arguments")))
    raw = rec.get("tools")
    if isinstance(raw, str):
        raw = _json_object(raw, "'tools'")
    tools = []
    for i, f in enumerate(raw or []):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise Malformed(f"tool {i} is not an object with a name")
        tools.append({"type": "function", "function": {
            "name": f["name"], "description": str(f.get("description", "")),
            "parameters": _xlam_parameters(f.get("parameters"), f"tool {f['name']!r}")}})
    return {"messages": [{"role": "user", "content": query.strip()}, _assistant("", made)], "tools": tools,
            "meta": {"ends_with_calls": True}}


FORMATS: dict[str, Callable[[dict], dict]] = {"openai": from_openai, "hermes": from_hermes,
                                              "sharegpt": from_sharegpt, "glaive": from_glaive,
                                              "xlam": from_xlam}


# ----------------------------------------------------------------------------- the command

class _StructureOnly:
    """A tokenizer that makes no tokens: render() then checks a record's structure only."""
    special_ids = {t: 0 for t in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids) -> str:
        return ""


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or the JSON error) of a JSONL file, or (index + 1, record) of
    a file holding one JSON array."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"data.import: {path} looks like a JSON array but does not parse: {e}") from None
            yield from enumerate(data, 1)
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, Malformed(f"not JSON ({e.msg} at column {e.colno})")


def convert(records: Iterator[tuple[int, Any]], fmt: str, source: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line, canonical record or None, why it was skipped or None) for every input record."""
    fn, tok = FORMATS[fmt], _StructureOnly()
    for n, rec in records:
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise Malformed(f"a record must be a JSON object, got {type(rec).__name__}")
            out = fn(rec)
            out["meta"] = out.get("meta", {}) | {"source": source, "source_format": fmt, "source_line": n}
            render(out, tok, name=f"line {n}")
            yield n, out, None
        except (Malformed, FormatError) as e:
            yield n, None, str(e).removeprefix(f"line {n}: ")


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m agentc.data.import", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=sorted(FORMATS))
    ap.add_argument("input", help="JSONL (one record per line) or a JSON array")
    ap.add_argument("out", help="canonical JSONL; skipped records go to OUT.skipped.jsonl")
    ap.add_argument("--quiet", action="store_true", help="do not print each skipped record")
    args = ap.parse_args(argv)
    try:
        records = read_records(args.input)
        n_in = n_out = 0
        skipped = []
        with open(args.out, "w", encoding="utf-8") as out, open(args.out + ".skipped.jsonl", "w", encoding="utf-8") as bad:
            for n, rec, why in convert(records, args.format, args.input):
                n_in += 1
                if rec is None:
                    skipped.append((n, why))
                    bad.write(json.dumps({"line": n, "reason": why}, ensure_ascii=False) + "\n")
                    if not args.quiet:
                        print(f"skipped line {n}: {why}", file=sys.stderr)
                    continue
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n_out += 1
    except OSError as e:
        raise SystemExit(f"data.import: {e}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"data.import: {args.input}: not UTF-8 text") from None
    print(f"{args.format}: {n_in} records read, {n_out} written to {args.out}, {len(skipped)} skipped"
          + (f" (listed in {args.out}.skipped.jsonl)" if skipped else ""))
    if not n_in:
        raise SystemExit(f"data.import: {args.input} holds no records")
    if not n_out:
        raise SystemExit(f"data.import: {args.input}: no record converted; is --format right?")
    return {"read": n_in, "written": n_out, "skipped": skipped}
