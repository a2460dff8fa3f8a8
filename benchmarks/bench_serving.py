"""Serving: throughput and latency of `mlflow models serve` for a loraflow model under 8 clients.

Setup (untimed): LoRA (r=4 on q/v, fixed-seed non-zero B) on the built-in tiny base, saved with the
loraflow flavor to a temporary directory; the in-process pyfunc answer for each prompt; then one real
`mlflow models serve --env-manager local -w 1` on a free loopback port, on the CPU.

Timed: 200 requests (40 with `quick`) of one prompt each, greedy, max_new_tokens=4, sent by 8
concurrent clients (threads with `urllib`), after 8 warm-up requests. Every answer is checked
against the in-process pyfunc answer; the server's resident memory (process tree, from /proc) is
read after the first quarter and at the end. Run: `python -m benchmarks.bench_serving [--quick]`.

Self-contained on purpose: benchmarks do not import from tests/, so the few helpers (free port,
waiting for the server, stopping its process group, RSS) are repeated here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLIENTS = 8
PARAMS = {"max_new_tokens": 4}
PROMPTS = [f"Question {i}: what is {word}?\nAnswer:" for i, word in enumerate(
    ["LoRA", "a cow", "the sky", "rank", "MLflow", "a model", "dropout", "a token", "Paris", "zero"])]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def _tree_rss_mib(pid: int) -> float | None:
    """Resident memory of a process and its descendants (Linux /proc); None elsewhere."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in (proc / str(current) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total / 2**20


def _save_model(path: Path) -> dict[str, str]:
    """Save the benchmark model; return the in-process pyfunc answer per prompt."""
    import mlflow
    import peft
    import torch

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    base = load_base_model("builtin:tiny").eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    flavor.save_model(model.eval(), path, load_tokenizer("builtin:tiny"), base_model="builtin:tiny", batch_size=4)
    pyfunc = mlflow.pyfunc.load_model(str(path), model_config={"device": "cpu"})
    return {p: pyfunc.predict([p], params=PARAMS)["text"][0] for p in PROMPTS}


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def measure(quick: bool = False) -> dict:
    """Start a server, send the load, and return the raw numbers."""
    n_requests = 40 if quick else 200
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model_dir = Path(tmp) / "model"
        expected = _save_model(model_dir)
        port = _free_port()
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CUDA_VISIBLE_DEVICES": "",
               "TOKENIZERS_PARALLELISM": "false"}
        with open(Path(tmp) / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_for(f"{url}/ping", proc)
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]

                def ask(prompt: str) -> tuple[float, bool]:
                    start = time.perf_counter()
                    status, body = _post(url, {"inputs": [prompt], "params": PARAMS})
                    elapsed = time.perf_counter() - start
                    ok = status == 200 and [r["text"] for r in body["predictions"]] == [expected[prompt]]
                    return elapsed, ok

                with ThreadPoolExecutor(max_workers=CLIENTS) as clients:
                    list(clients.map(ask, PROMPTS[:CLIENTS]))  # warm-up, untimed
                    quarter = n_requests // 4
                    start = time.perf_counter()
                    results = list(clients.map(ask, prompts[:quarter]))
                    rss_quarter = _tree_rss_mib(proc.pid)
                    results += list(clients.map(ask, prompts[quarter:]))
                    wall = time.perf_counter() - start
                    rss_end = _tree_rss_mib(proc.pid)
            finally:
                _stop(proc)
    latencies = sorted(r[0] for r in results)
    return {
        "requests": n_requests,
        "clients": CLIENTS,
        "correct": sum(r[1] for r in results),
        "wall_s": wall,
        "throughput": n_requests / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * _percentile(latencies, 99),
        "rss_quarter_mib": rss_quarter,
        "rss_end_mib": rss_end,
        "cpus": os.cpu_count(),
    }


def run(quick: bool = False) -> str:
    """Run the serving benchmark; return its results as a markdown section."""
    r = measure(quick)
    rss = (f"{r['rss_quarter_mib']:.0f} MiB after {r['requests'] // 4} requests, {r['rss_end_mib']:.0f} MiB "
           f"after {r['requests']}" if r["rss_end_mib"] is not None else "not measured (no /proc)")
    return "\n".join([
        "## Serving: `mlflow models serve` under concurrent clients",
        "",
        f"{r['requests']} requests of one prompt (greedy, max_new_tokens={PARAMS['max_new_tokens']}) from "
        f"{r['clients']} concurrent clients to one server (`-w 1`, CPU, {r['cpus']} CPUs visible), built-in tiny "
        "base + LoRA r=4. Latency is per request as the client sees it (queueing included).",
        "",
        "| requests | correct | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | server RSS |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {r['requests']} | {r['correct']}/{r['requests']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | "
        f"{r['p99_ms']:.0f} | {rss} |",
        "",
        "Correct: equal to in-process `mlflow.pyfunc` predict for the same prompt. One run, not repeated: "
        "treat the numbers as an order of magnitude on a shared machine.",
    ])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(run(quick="--quick" in sys.argv[1:]))
