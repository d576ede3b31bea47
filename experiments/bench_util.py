"""What the benchmarks in experiments/ share: the record of the machine a figure was measured on,
a timing loop, and where the JSON goes. A figure is only comparable with another measured on the
same device, instruction sets and versions, so every benchmark's JSON names them the same way.

    from experiments.bench_util import device_name, machine, results_path, timed
"""
from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(name: str) -> str:
    """experiments/results/DATE-NAME.json: where a benchmark writes when not given --out."""
    return os.path.join(RESULTS, f"{datetime.date.today()}-{name}.json")


def timed(fn: Callable, runs: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `runs` calls of fn(), in call order, after `warmup` untimed calls
    (compilation, autotuning, the allocator's first requests). On a GPU fn must wait for its own
    work (.item(), torch.cuda.synchronize()), or this times the launches only."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu() -> dict:
    """The CPU by name and by the instruction sets CPU figures depend on (avx2, avx512*, amx*):
    "2 cores" says little when an AVX512-BF16 or AMX machine multiplies bfloat16 several times
    faster than an AVX2 one. From the first processor in /proc/cpuinfo; where there is none (not
    Linux) the platform's name and no instruction sets."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name") or platform.processor(),
            "cpu_instruction_sets": sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))}


def device_name(cuda: bool) -> str:
    """The GPU's name, or what the platform calls the processor (on Linux often just x86_64: see
    cpu() for the CPU's model)."""
    if cuda:
        import torch
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def machine(cuda: bool) -> dict:
    """The keys every torch benchmark's JSON starts with: the device, the CPU (name, instruction
    sets, torch's threads and the instruction set its CPU kernels run: ATEN_CPU_CAPABILITY can set
    it below what the CPU has) and the versions of torch and Python."""
    import torch
    return {"device": device_name(cuda), **cpu(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
