"""Compile our Triton kernels (attention, fused loss) for a GPU that is not here, and report what the compiler
made of them: registers, local-memory spills (stack bytes), shared memory, and whether the matrix
products became Hopper's wgmma (HGMMA in the SASS). No GPU needed: Triton's wheel carries ptxas,
cuobjdump and nvdisasm.

    python experiments/kernel_report.py                  # every autotune config, sm_90, bf16
    python experiments/kernel_report.py --quick --head-dim 128

Writes experiments/results/DATE-kernel-report-smARCH.json. Run it before spending GPU time: a config
that spills (stack > 0) will be slow whatever the tuning.
"""
from __future__ import annotations

import argparse
import datetime
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real compilation, not the CPU interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import agentc.kernels.flash_attention as fa  # noqa: E402
import agentc.kernels.masked_ce as ce  # noqa: E402

PTR = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LOGITS"}
F32_PTR = {"LSE", "DELTA", "WEIGHTS", "LOSS"}
I32_PTR = {"STARTS", "ENDS"}
I64_PTR = {"TARGETS"}
FLOATS = {"qk_scale", "sm_scale", "z_loss"}


def compile_for(kernel, constexprs: dict, num_warps: int, num_stages: int, arch: int, dtype: str):
    names = kernel.arg_names
    sig = {}
    for n in names:
        sig[n] = ("constexpr" if n in constexprs else f"*{dtype}" if n in PTR else "*fp32" if n in F32_PTR
                  else "*i32" if n in I32_PTR else "*i64" if n in I64_PTR else "fp32" if n in FLOATS else "i32")
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> dict:
    from triton.backends.nvidia import compiler as nvc
    bindir = os.path.join(os.path.dirname(nvc.__file__), "bin")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(tok.split(":") for tok in next(l for l in usage.splitlines() if "REG:" in l).split() if ":" in tok)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": compiled.metadata.shared, "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA"),
            "local_loads": sass.count("LDL"), "local_stores": sass.count("STL")}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--quick", action="store_true", help="the first autotune config of each kernel only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kernels = [("fwd", fa._fwd_kernel, "fwd"), ("dq", fa._dq_kernel, "bwd"), ("dkdv", fa._dkdv_kernel, "bwd")]
    rows = []
    for D in args.head_dim:
        for name, kernel, kind in kernels:
            configs = fa._configs(kind)[:1] if args.quick else fa._configs(kind)
            for c in configs:
                cx = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_DOCS=True, PRECISION="tf32",
                          UPCAST=False, **c.kwargs)
                row = {"kernel": name, "head_dim": D, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                row.update(resources(compile_for(kernel, cx, c.num_warps, c.num_stages, args.arch, args.dtype)))
                rows.append(row)
                print(f"{name:5s} D={D:3d} BM={row['BM']:3d} BN={row['BN']:3d} warps={row['num_warps']} "
                      f"stages={row['num_stages']}  regs {row['registers']:3d}  stack {row['stack_bytes']:5d} B  "
                      f"shared {row['shared_bytes'] // 1024:3d} KiB  HGMMA {row['hgmma']:3d}  HMMA {row['hmma']}", flush=True)
    for BV, warps in ((8192, 8), (4096, 8)):  # the fused loss's row kernel (kernels/masked_ce.py)
        for grad in (True, False):
            row = {"kernel": "ce_rows", "BV": BV, "write_grad": grad, "num_warps": warps, "num_stages": 1}
            row.update(resources(compile_for(ce._ce_rows_kernel, dict(BV=BV, WRITE_GRAD=grad), warps, 1,
                                             args.arch, args.dtype)))
            rows.append(row)
            print(f"ce_rows BV={BV} grad={grad} warps={warps}  regs {row['registers']:3d}  stack {row['stack_bytes']:5d} B", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{datetime.date.today()}-kernel-report-sm{args.arch}.json")
    with open(out, "w") as f:
        json.dump({"arch": args.arch, "dtype": args.dtype, "triton": triton.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
