"""python -m agentc.data.import: hand-written samples of each format (tests/import_samples), bad records
included, become canonical trajectories that render; every bad record is reported with its line
number and reason, listed in OUT.skipped.jsonl, and skipped."""
import json
import os
import subprocess
import sys

import pytest

from agentc.data.format import render
from agentc.data.importers import main

SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "import_samples")

# format -> (sample, records written, {line: a fragment of the reason it was skipped})
CASES = {
    "openai": ("openai.jsonl", 2, {3: "not JSON", 4: "has no tool result", 5: "arguments of call to 'f' are not JSON"}),
    "hermes": ("hermes.json", 2, {3: "<tool_call> that is not JSON", 4: "unknown speaker 'narrator'"}),
    "sharegpt": ("sharegpt.json", 2, {3: "2 calls but not a list of 2 results", 4: "no call before it"}),
    "glaive": ("glaive.jsonl", 2, {3: "before any user message", 4: "arguments of call to 'f' are not JSON"}),
    "xlam": ("xlam.json", 2, {3: "no calls in 'answers'", 4: "'answers' that is not JSON", 5: "no 'query'",
                              6: "without a function name"}),
}


def run(fmt, tmp_path, capsys):
    sample, _, _ = CASES[fmt]
    out = tmp_path / f"{fmt}.jsonl"
    report = main(["--format", fmt, os.path.join(SAMPLES, sample), str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = [json.loads(line) for line in (tmp_path / f"{fmt}.jsonl.skipped.jsonl").read_text().splitlines()]
    return report, records, skipped, capsys.readouterr()


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_each_format_converts_and_reports_bad_records(fmt, tmp_path, capsys, calc_corpus):
    report, records, skipped, printed = run(fmt, tmp_path, capsys)
    _, n_ok, bad = CASES[fmt]
    assert report["written"] == len(records) == n_ok and report["read"] == n_ok + len(bad)
    assert {s["line"] for s in skipped} == set(bad)
    for s in skipped:
        assert bad[s["line"]] in s["reason"], s
        assert f"skipped line {s['line']}: " in printed.err
    assert f"{n_ok} written" in printed.out and f"{len(bad)} skipped" in printed.out
    for r in records:
        assert r["meta"]["source_format"] == fmt and r["meta"]["source_line"] not in bad
        rendered = render(r, calc_corpus["tok"])  # a real tokenizer: the records pack
        assert rendered.weights.sum() > 0


def test_conversions_keep_calls_results_and_reasoning(tmp_path, capsys):
    _, oa, _, _ = run("openai", tmp_path, capsys)
    legacy = oa[1]["messages"]  # function_call + role function -> tool_calls + role tool
    assert legacy[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert legacy[1]["reasoning"] == "Let me add them." and legacy[2]["role"] == "tool"
    assert legacy[2]["tool_call_id"] == legacy[1]["tool_calls"][0]["id"] and legacy[2]["content"] == "5"
    assert oa[1]["tools"][0]["function"]["name"] == "add"

    _, he, _, _ = run("hermes", tmp_path, capsys)
    msgs = he[0]["messages"]
    assert msgs[2]["reasoning"] == "I'll fetch both." and len(msgs[2]["tool_calls"]) == 2
    assert [m["tool_call_id"] for m in msgs[3:5]] == ["call_0", "call_1"] and "12.5" in msgs[3]["content"]
    assert he[0]["tools"][0]["function"]["name"] == "get_stock_price"
    assert he[1]["messages"][2]["role"] == "tool"  # a <tool_response> sent as a user turn

    _, sg, _, _ = run("sharegpt", tmp_path, capsys)
    assert sg[0]["messages"][0] == {"role": "system", "content": "You book restaurants."}
    assert json.loads(sg[0]["messages"][2]["tool_calls"][0]["function"]["arguments"])["people"] == 2
    assert [m["content"] for m in sg[1]["messages"][2:4]] == ["sunny", "cloudy"]  # parallel results split

    _, gl, _, _ = run("glaive", tmp_path, capsys)
    call = gl[0]["messages"][2]["tool_calls"][0]["function"]
    assert call["name"] == "calculate_bmi" and json.loads(call["arguments"]) == {"weight": 70, "height": 1.75}
    assert gl[0]["tools"][0]["function"]["name"] == "calculate_bmi"
    assert gl[1]["messages"][-1]["content"].startswith("Why did the scarecrow")


def test_xlam_records_are_call_only_with_json_schema_tools(tmp_path, capsys):
    _, xl, _, _ = run("xlam", tmp_path, capsys)
    msgs = xl[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and xl[0]["meta"]["ends_with_calls"] is True
    assert [json.loads(c["function"]["arguments"])["target"] for c in msgs[1]["tool_calls"]] == ["EUR", "JPY"]
    convert, rates = (t["function"]["parameters"] for t in xl[0]["tools"])
    assert convert["properties"]["amount"] == {"type": "number", "description": "The amount to convert.",
                                               "default": 1.0}
    assert convert["required"] == ["source", "target"]  # a default makes a parameter optional
    assert rates["properties"]["base"]["type"] == "string" and rates["properties"]["symbols"]["type"] == "array"
    assert rates["required"] == ["symbols", "when"]  # "str, optional" is not required
    assert "type" not in rates["properties"]["when"] and "(type: datetime.date)" in rates["properties"]["when"]["description"]
    assert xl[1]["tools"][0]["function"]["parameters"]["required"] == ["text"]  # tools given as a list, not a string


def test_module_entry_point_and_wrong_format(tmp_path):
    root = os.path.dirname(SAMPLES)
    p = subprocess.run([sys.executable, "-m", "agentc.data.import", "--format", "glaive", os.path.join(SAMPLES, "openai.jsonl"),
                        str(tmp_path / "x.jsonl"), "--quiet"], cwd=os.path.dirname(root), capture_output=True, text=True)
    assert p.returncode != 0 and "no record converted; is --format right?" in p.stderr
