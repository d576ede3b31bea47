"""What the interrupt/resume runtime saves: latency of one agent step at growing context lengths
in the three engine modes, and decode speed against Hugging Face `generate` on the same weights.

    python experiments/bench_runtime.py                    # CPU: small preset, contexts 512..8192
    python experiments/bench_runtime.py --model=125m --device=cuda

One step = ingest an observation of --obs tokens, then decode --decode tokens, with --context
tokens already in the episode:
  incremental  the observation in one forward at the cache offset, then decoding (infer.py)
  reprefill    the whole context re-encoded, then decoding (an orchestration loop)
  tokenwise    the observation one token at a time, then decoding (a plain generate loop)
Weights are random (speed does not depend on them); tokens are forced, so every run decodes
exactly --decode tokens. Writes experiments/results/DATE-runtime-DEVICE-MODEL.json and .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from infer import Engine  # noqa: E402
from agentc.model import checkpoint  # noqa: E402
from agentc.model.transformer import PRESETS, ModelConfig, Transformer  # noqa: E402


class FakeTok:
    """Just enough of a tokenizer for the engine: special ids past the bench's token range."""

    def __init__(self, vocab: int):
        from agentc.data.format import SPECIAL_TOKENS
        self.special_ids = {t: vocab - 1 - i for i, t in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = vocab

    def unsampled_ids(self):
        return list(self.special_ids.values())

    def random_ids(self, n: int, gen: torch.Generator) -> list[int]:
        """n ordinary (non-special) token ids."""
        return torch.randint(0, min(1000, self.vocab_size - len(self.special_ids)), (n,), generator=gen).tolist()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_latency(model, tok, mode, context, obs, decode, device, repeats):
    times = []
    gen = torch.Generator().manual_seed(context)
    for _ in range(repeats):
        e = Engine(model, tok, max_len=context + obs + decode + 8, mode=mode, prefill_chunk=4096)
        ids = tok.random_ids(context + obs, gen)
        e.feed(ids[:context], first=True)
        sync(device)
        t0 = time.perf_counter()
        logits = e.feed(ids[context:])
        e.decode(logits, decode, policy=lambda _: 7)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(model, tok, prompt, n, device, repeats):
    """(ours, hf) decode tokens/s after a prompt of `prompt` tokens, greedy, batch 1."""
    from transformers import AutoModelForCausalLM
    ids = tok.random_ids(prompt, torch.Generator().manual_seed(1))

    def ours(k):
        e = Engine(model, tok, max_len=prompt + k + 8)
        greedy = lambda logits: (lambda t: 7 if t in e.stop else t)(e.sample(logits))  # noqa: E731
        sync(device)
        t0 = time.perf_counter()
        e.decode(e.feed(ids, first=True), k, policy=greedy)  # the real sampler: ban, argmax
        sync(device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(model, d, arch="llama")
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=next(model.parameters()).dtype,
                                                  attn_implementation="sdpa").to(device).eval()
    x = torch.tensor([ids], device=device)

    @torch.no_grad()
    def theirs(k):
        sync(device)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    out = {}
    for name, run in (("agentc", ours), ("hf_generate", theirs)):
        run(4)  # warm up
        full = statistics.median(run(n) for _ in range(repeats))
        first = statistics.median(run(1) for _ in range(repeats))
        out[name] = (n - 1) / (full - first)  # decode only: the prefill + first token is subtracted
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", choices=list(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--obs", type=int, default=64, help="observation tokens per step (SQL mean: ~20)")
    ap.add_argument("--decode", type=int, default=32, help="model tokens per step (SQL mean: ~29)")
    ap.add_argument("--decode-speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/DATE-runtime-DEVICE-MODEL.json)")
    args = ap.parse_args()

    torch.manual_seed(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = ModelConfig.preset(args.model, vocab_size=args.vocab_size, max_seq_len=max(contexts) + 1024)
    model = Transformer(cfg).to(args.device).eval()
    tok = FakeTok(args.vocab_size)
    latency = {m: {} for m in ("incremental", "reprefill", "tokenwise")}
    for c in contexts:
        for m in latency:
            latency[m][c] = step_latency(model, tok, m, c, args.obs, args.decode, args.device, args.repeats)
        print(f"context {c:>5}: " + ", ".join(f"{m} {1e3 * latency[m][c]:.1f} ms" for m in latency), flush=True)
    speed = decode_speed(model, tok, 256, args.decode_speed_tokens, args.device, args.repeats)
    print(f"decode after a 256-token prompt: agentc {speed['agentc']:.1f} tok/s, "
          f"HF generate {speed['hf_generate']:.1f} tok/s", flush=True)

    cuda = args.device.startswith("cuda")
    import transformers
    result = {
        "what": "latency of one agent step (ingest an observation, decode) vs context; decode tokens/s",
        "model": args.model, "params": model.num_params(), "vocab_size": args.vocab_size,
        "obs_tokens": args.obs, "decode_tokens": args.decode, "step_latency_s": latency,
        "decode_tokens_per_s": speed, "decode_prompt_tokens": 256,
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "precision": str(next(model.parameters()).dtype), "repeats": args.repeats,
    }
    base = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{datetime.date.today()}-runtime-{'cuda' if cuda else 'cpu'}-{args.model}.json")
    with open(base, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {base}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m, style in zip(latency, ("o-", "s--", "^:")):
        ax.plot(contexts, [1e3 * latency[m][c] for c in contexts], style, label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens already in the episode")
    ax.set_ylabel(f"ms per step ({args.obs}-token observation + {args.decode} decoded)")
    ax.set_title(f"{args.model} ({model.num_params() / 1e6:.1f}M), {result['device']}, {result['precision']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(base.replace(".json", ".png"), dpi=120)
    print(f"wrote {base.replace('.json', '.png')}")


if __name__ == "__main__":
    main()
