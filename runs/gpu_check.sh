#!/usr/bin/env bash
# One prepared GPU check, at most 10 minutes on one H100/H200: the kernel tests on the GPU (every
# shape, the large GPU-only ones included), then the four benchmarks, each under its own time
# limit so that one that hangs cannot take the others with it. Every result is a JSON file in
# RESULTS (default experiments/results/, named DATE-gpu-...) with the device and the versions;
# DATE-gpu-check.json says which step passed, failed or ran out of time, with its log's tail.
#
#   bash runs/gpu_check.sh                      # on the GPU machine
#   bash runs/gpu_check.sh --dry-run            # CPU: the same steps, smallest shapes, Triton's
#                                               # interpreter; results go to RESULTS (default a temp dir)
#   bash runs/gpu_check.sh --fetch-wheels       # here, before: wheels of what a bare GPU image lacks,
#                                               # into .whl/ (carry it along; the check installs them)
#
# A machine without registry access runs the check with its own python3 and packages; what they
# lack (jsonschema, gguf) travels as wheels in .whl/, which this script installs to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --fetch-wheels) MODE=wheels ;;
    "") ;;
    *) echo "gpu_check.sh: unknown argument ${1} (--dry-run or --fetch-wheels)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}

if [ $MODE = wheels ]; then
    # for the GPU image's Python 3.12, without their dependencies (the image has attrs, numpy,
    # pyyaml, tqdm, requests); the exact versions CI passed with where constraints.txt has them
    pins=$(grep -iE '^(jsonschema|jsonschema-specifications|referencing|rpds-py|gguf)==' constraints.txt)
    rm -rf .whl && mkdir -p .whl
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins || exit 1
    ls .whl
    exit 0
fi

if [ $MODE = dry ]; then
    RESULTS=${RESULTS:-$(mktemp -d)}
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    LIMIT=600
else
    RESULTS=${RESULTS:-experiments/results}  # each step has its own limit: 150 + 110 + 90 + 80 + 80 + 80 s, under 10 min
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site
    fi
fi
mkdir -p "$RESULTS"
DATE=$(date +%F)  # results are named by date and a slug
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
STEPS=()

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its status and log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$LOGS/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    STEPS+=("$name $rc $((SECONDS - t0))")
}

if [ $MODE = dry ]; then
    # the same steps at their smallest: the default kernel tests (small shapes) and each benchmark's
    # CPU mode, so a broken flag, import or output path shows here before it costs GPU time
    step tests $LIMIT $PY -m pytest -q -p no:cacheprovider \
        "tests/test_flash_attention.py::test_matches_reference_float32[1-4-4-64-False]" \
        "tests/test_flash_attention.py::test_matches_reference_float32[17-4-1-80-True]" \
        "tests/test_flash_attention.py::test_cache_append_matches_full_attention[dtype0-1-1]" \
        "tests/test_masked_ce.py::test_matches_reference_float32[0.0-1-1000-16-one]"
    step attention $LIMIT $PY experiments/bench_attention.py --smoke --out "$RESULTS/attention_smoke.json"
    step ce $LIMIT $PY experiments/bench_ce.py --smoke --out "$RESULTS/ce_smoke.json"
    step train $LIMIT $PY experiments/bench_train.py --model=tiny --seq-len=256 --batch-size=1 --steps=2 --warmup=1 \
        --vocab-size=512 --device=cpu --dtype=float32 --out "$RESULTS/train_dry.json"
    step train_fsdp $LIMIT $PY -m torch.distributed.run --standalone --nproc_per_node=2 experiments/bench_train.py \
        --model=tiny --seq-len=256 --steps=2 --warmup=1 --vocab-size=512 --device=cpu --parallel=fsdp \
        --activation-checkpointing=selective --out "$RESULTS/train_fsdp_dry.json"
    step runtime $LIMIT $PY experiments/bench_runtime.py --model=tiny --vocab-size=512 --contexts=64,128 --obs=8 \
        --decode=4 --decode-tokens=8 --repeats=1 --parts=latency,decode --device=cpu --out "$RESULTS/runtime_dry.json"
else
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$LOGS/nvidia-smi.txt" 2>&1
    # kernel tests on the GPU, compiled: every shape, GPU-only ones included (the CPU smoke runs of the
    # benchmarks are left to the steps below, which run them for real)
    step tests 150 $PY -m pytest -q -p no:cacheprovider -m "slow or not slow" -k "not runs_end_to_end" \
        tests/test_flash_attention.py tests/test_masked_ce.py tests/test_model.py
    step attention 110 $PY experiments/bench_attention.py --seq 2048 16384 --head-dim 128 \
        --out "$RESULTS/$DATE-gpu-attention.json"
    step ce 90 $PY experiments/bench_ce.py --n 32768 --d 2048 4096 --vocab 32768 131072 --share 0.3 \
        --out "$RESULTS/$DATE-gpu-ce.json"
    step train 80 $PY experiments/bench_train.py --model=125m --seq-len=4096 --batch-size=8 --steps=10 --warmup=3 \
        --out "$RESULTS/$DATE-gpu-train-125m.json"
    # a 1B model on rows of 8k with selective recomputation: MFU, and peak memory against the memory model
    step train1b 80 $PY experiments/bench_train.py --model=1b --vocab-size=32768 --seq-len=8192 --batch-size=1 \
        --activation-checkpointing=selective --steps=5 --warmup=2 --out "$RESULTS/$DATE-gpu-train-1b-T8192.json"
    step runtime 80 $PY experiments/bench_runtime.py --device=cuda --parts=latency,decode,eval --contexts=512,2048,8192 \
        --eval-runs=16:32 --eval-quant=bf16 --quants=fp32,bf16 --out "$RESULTS/$DATE-gpu-runtime.json"
fi

# the summary: one JSON with the machine, the versions, and each step's status and log tail
SUMMARY="$RESULTS/$DATE-gpu-check.json"
[ $MODE = dry ] && SUMMARY="$RESULTS/gpu_check_dry.json"
$PY - "$SUMMARY" "$LOGS" "$MODE" "${STEPS[@]}" <<'EOF'
import json, os, platform, sys
path, logs, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
import torch
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
status = {0: "passed", 124: "timed out", 137: "timed out"}
summary = {"mode": mode, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine()),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "python": platform.python_version(), "steps": []}
smi = os.path.join(logs, "nvidia-smi.txt")
if os.path.exists(smi):
    summary["nvidia_smi"] = open(smi).read().strip()
for s in steps:
    name, rc, secs = s.split()
    tail = open(os.path.join(logs, name + ".log"), errors="replace").read().splitlines()[-40:]
    summary["steps"].append({"name": name, "status": status.get(int(rc), "failed"), "exit": int(rc),
                             "seconds": int(secs), "log_tail": tail})
with open(path, "w") as f:
    json.dump(summary, f, indent=1)
print("\n".join(f"{s['name']:10s} {s['status']:10s} {s['seconds']:4d}s" for s in summary["steps"]))
print("wrote", path)
sys.exit(0 if all(s["exit"] == 0 for s in summary["steps"]) else 1)
EOF
