"""Export time and output size per format (`loraflow export`), on one freshly trained tiny model.

Standalone: trains `builtin:tiny` for a few steps (offline, bundled sample data) into a temporary
sqlite MLflow store, then exports that run's model in each format `--repeats` times (default 3)
and prints a Markdown table of the median export time and the output size. For `transformers`
the size is the logged model's artifact folder. Nothing outside this repository is needed:

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/bench_export.py [--repeats 3] [--max-steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FORMATS = ("merged", "adapter", "transformers")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def train_tiny(root: Path, max_steps: int) -> str:
    """Train builtin:tiny for `max_steps` steps; return the logged model's runs:/ URI."""
    from loraflow.config import parse_settings
    from loraflow.train import run_training

    raw = {"max_steps": str(max_steps), "eval_steps": str(max_steps), "batch_size": "8", "r": "8",
           "output_dir": str(root / "outputs")}
    lora, settings = parse_settings(raw)
    result = run_training(lora, settings, explicit=set(raw))
    if not result.ok or not result.model_uri:
        raise SystemExit("training did not log a model")
    return result.model_uri


def export_once(uri: str, fmt: str, output: Path) -> tuple[float, int]:
    """One export; returns (seconds, output bytes)."""
    import mlflow

    from loraflow.export import export_model

    started = time.perf_counter()
    result = export_model(uri, fmt, output if fmt != "transformers" else None, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    if fmt == "transformers":
        local = mlflow.artifacts.download_artifacts(result.output, dst_path=str(output.parent / f"dl-{output.name}"))
        return seconds, dir_bytes(Path(local))
    return seconds, dir_bytes(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args()

    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # the sqlite store's default artifact root is ./mlruns
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        uri = train_tiny(root, args.max_steps)
        rows = []
        for fmt in FORMATS:
            times, size = [], 0
            for i in range(args.repeats):
                seconds, size = export_once(uri, fmt, root / f"{fmt}-{i}")
                times.append(seconds)
            rows.append((fmt, statistics.median(times), size))

    print(f"\nExport of one trained `builtin:tiny` LoRA model (r=8, {args.max_steps} steps), "
          f"median of {args.repeats}:\n")
    print("| format | export time (s) | output size |")
    print("|---|---:|---:|")
    for fmt, seconds, size in rows:
        print(f"| {fmt} | {seconds:.2f} | {human(size)} |")


if __name__ == "__main__":
    main()
