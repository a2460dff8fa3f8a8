#!/usr/bin/env bash
# Create .venv and install loraflow with its test extras.
# torch: install the pinned CPU build only when no torch is present, so a user's CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU build)"
    python -m pip install --quiet "torch==2.13.0"
fi
echo "[setup] installing loraflow and its test dependencies"
python -m pip install --quiet -e ".[test]"
