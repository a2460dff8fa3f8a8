#!/usr/bin/env bash
# QLoRA on a GPU, the day one is at hand (not part of CI): trains a few steps with
# `loraflow train --quantization nf4 --precision bf16` and with `--quantization none --precision bf16`,
# the same LoRA settings and batch, and prints each run's peak GPU memory (the run's
# `peak_gpu_memory_mib` metric: torch.cuda.max_memory_allocated) and peak RSS.
#
#   bash benchmarks/gpu_check.sh                       # the built-in model
#   BASE_MODEL=Qwen/Qwen2.5-0.5B STEPS=20 bash benchmarks/gpu_check.sh
#
# Needs bitsandbytes (pip install -e '.[quantization]') and a CUDA GPU; refuses to run without one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
BASE_MODEL="${BASE_MODEL:-builtin:tiny}"
STEPS="${STEPS:-10}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one" >&2
    exit 2
fi

WORK="$(mktemp -d -t loraflow-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"

for quantization in nf4 none; do
    "$PYTHON" -m loraflow train --base-model "$BASE_MODEL" --quantization "$quantization" --precision bf16 \
        --max-steps "$STEPS" --eval-steps "$STEPS" --eval-samples 0 --batch-size 8 --r 16 \
        --target-modules q_proj,v_proj --run-name "gpu-check-$quantization" --output-dir "$WORK/outputs" \
        > "$WORK/$quantization.log" 2>&1 || { echo "gpu_check.sh: the $quantization run failed:" >&2; tail -20 "$WORK/$quantization.log" >&2; exit 1; }
done

"$PYTHON" - <<'EOF'
from mlflow import MlflowClient

client = MlflowClient()
runs = client.search_runs(client.get_experiment_by_name("Default").experiment_id)
by_name = {run.info.run_name: run.data.metrics for run in runs}
print(f"{'quantization':<14}{'peak GPU memory (MiB)':>24}{'peak RSS (MiB)':>18}")
for quantization in ("nf4", "none"):
    metrics = by_name[f"gpu-check-{quantization}"]
    print(f"{quantization:<14}{metrics['peak_gpu_memory_mib']:>24.1f}{metrics['peak_rss_mib']:>18.1f}")
nf4, full = by_name["gpu-check-nf4"], by_name["gpu-check-none"]
print(f"nf4 / bf16 peak GPU memory: {nf4['peak_gpu_memory_mib'] / full['peak_gpu_memory_mib']:.2f}x")
EOF
