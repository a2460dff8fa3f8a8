#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact versions that scripts/setup.sh installs and the suite
# is run with (Python 3.11, Linux, CPU torch, every extra the tests and docs use).
# Moving the lock forward: bash scripts/lock.sh, then bash scripts/test.sh, fix, commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m pip install --quiet "pip-tools>=7.4"
.venv/bin/pip-compile --quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links \
    --extra test --extra quantization --extra gguf --extra sweep --extra docs \
    --constraint requirements/torch-cpu.txt --output-file requirements/lock.txt pyproject.toml
echo "[lock] requirements/lock.txt:"
grep -E '^(mlflow|torch|transformers|peft|accelerate|bitsandbytes|optuna)==' requirements/lock.txt
