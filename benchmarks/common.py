"""Shared benchmark helpers: machine facts, medians and ratios, one child process per measured side.

Every measured side runs in its own fresh Python process (`run_child`), so its peak RSS
(`peak_rss_mib`) is its own and no side warms a cache for the other. Sides alternate A, B, A, B, ...
and each comparison is reported as medians plus the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "true",
    "PYTHONWARNINGS": "ignore",
}


# ---------------------------------------------------------------------------------------------
# Statistics.


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def median_ratio_interval(a: list[float], b: list[float], *, level: float = 0.95, draws: int = 4000) -> tuple[float, float]:
    """Percentile bootstrap interval of median(a) / median(b), each side resampled on its own.

    Seeded, so a results file is reproducible from its samples.
    """
    import random

    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b))) for _ in range(draws)
    )
    tail = (1 - level) / 2
    return ratios[int(tail * draws)], ratios[min(draws - 1, int((1 - tail) * draws))]


def summarize(samples: list[dict[str, Any]], key: str) -> float:
    return median([s[key] for s in samples])


# ---------------------------------------------------------------------------------------------
# Machine and versions.


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "logical cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("loraflow", "torch", "transformers", "peft", "accelerate", "mlflow", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB: on Linux the kernel's high-water mark of its
    own memory (`VmHWM`), else `ru_maxrss`.

    Not `ru_maxrss` on Linux: it keeps the resident size of the parent at the fork across the exec,
    so every child of a large benchmark process would report at least the parent's size. Measured:
    a 13 MiB child of a 1.5 GB parent reported 1,513 MiB. (`loraflow.tracking.peak_rss_mib` reads
    the same; it is not imported here, so a baseline's child never loads loraflow.)
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Measured dense fp32 matmul FLOP/s on this machine: the best of a few timed n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Child processes.


def positive_int(text: str) -> int:
    """An argparse `type` for counts such as `--repeats`: a whole number of at least 1. argparse
    reports anything else as a usage error (exit 2) before any side runs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_child(module: str, function: str, kwargs: dict[str, Any], *, timeout: float = 1800) -> dict[str, Any]:
    """Run `benchmarks.<module>.<function>(**kwargs)` in a fresh interpreter and return its dict.

    The child adds its own peak RSS (`peak_rss_mib`) to the result, and this process the machine's
    1-minute load average as the child starts and as it ends (`load_1min`). Raises RuntimeError with
    the child's stderr tail if it fails.
    """
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        out = Path(tmp) / "result.json"
        args = [sys.executable, "-m", "benchmarks.common", module, function, json.dumps(kwargs), str(out)]
        env = {**os.environ, **CHILD_ENV}
        proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{module}.{function} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return {**json.loads(out.read_text()), "load_1min": [load_before, os.getloadavg()[0]]}


def alternate(sides: dict[str, Callable[[int], dict[str, Any]]], repeats: int, log: Callable[[str], None] = print):
    """Run each side once per round, in A B / B A order by round, `repeats` rounds."""
    names = list(sides)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            results[name].append(sides[name](i))
            log(f"    round {i + 1}/{repeats} {name}: {time.perf_counter() - started:.1f}s")
    return results


def _child_main() -> None:
    import importlib

    module, function, kwargs, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    result = getattr(importlib.import_module(f"benchmarks.{module}"), function)(**kwargs)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _child_main()
