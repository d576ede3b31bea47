"""Export a compiled agent (a train.py checkpoint directory) for other runtimes.

    python -m agentc.runtime.export out/sql_smol --hf out/sql_smol_hf               # transformers, vLLM
    python -m agentc.runtime.export out/sql_smol --gguf out/sql_smol.gguf --type q8_0  # llama.cpp (f32|f16|q8_0)

The Hugging Face directory gets the weights and config (agentc/model/checkpoint.export_hf) and
the tokenizer: tokenizer.json for a byte-level BPE agent, tokenizer.model for a sentencepiece one.
The GGUF file holds both (agentc/model/gguf_io.export_gguf). Our special tokens are control tokens in either.
"""
from __future__ import annotations

import os
import shutil

from agentc.model import checkpoint, gguf_io
from agentc.runtime import agent as agent_dir
from agentc.util import ArgumentParser, run_main, write_json


def export_hf_agent(path: str, out: str, arch: str = "llama") -> None:
    model = checkpoint.load(path)
    tok = agent_dir.tokenizer(path)
    checkpoint.export_hf(model, out, arch=arch)
    if tok.path.endswith(".bpe.json"):
        write_json(os.path.join(out, "tokenizer.json"), tok.data["tokenizer"])
    else:
        shutil.copy(tok.path, os.path.join(out, "tokenizer.model"))


def export_gguf_agent(path: str, out: str, out_type: str = "f16") -> None:
    model = checkpoint.load(path)
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, "agent.json")):
        name = f"agentc-{'-'.join(agent_dir.workflow_names(path)) or name}"
    gguf_io.export_gguf(model, out, agent_dir.tokenizer(path), out_type, name=name)


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m agentc.runtime.export", description=__doc__.split("\n")[0])
    ap.add_argument("agent", help="compiled agent directory (or a train.py --out directory: its newest checkpoint)")
    ap.add_argument("--hf", default=None, help="write a Hugging Face directory here")
    ap.add_argument("--arch", default="llama", choices=list(checkpoint.HF_ARCHITECTURES), help="HF model_type")
    ap.add_argument("--gguf", default=None, help="write a GGUF file here")
    ap.add_argument("--type", default="f16", choices=gguf_io.EXPORT_TYPES, help="GGUF matrix type")
    args = ap.parse_args(argv)
    if not args.hf and not args.gguf:
        ap.error("give --hf DIR and/or --gguf FILE")
    if args.gguf and os.path.isdir(args.gguf):
        ap.error(f"--gguf {args.gguf} is a directory; give the .gguf file to write")
    if args.hf and os.path.isfile(args.hf):
        ap.error(f"--hf {args.hf} is a file; give the directory to write")
    try:
        agent = agent_dir.resolve(args.agent)
        if args.hf:
            export_hf_agent(agent, args.hf, args.arch)
            print(f"wrote {args.hf}")
        if args.gguf:
            export_gguf_agent(agent, args.gguf, args.type)
            print(f"wrote {args.gguf} ({args.type}, {os.path.getsize(args.gguf) / 2**20:.1f} MiB)")
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"agentc.runtime.export: {e}") from None


if __name__ == "__main__":
    run_main(main, "agentc.runtime.export")
