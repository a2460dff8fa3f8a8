#!/usr/bin/env bash
# Create .venv with exactly the versions in requirements/lock.txt (the versions the suite last
# passed with), then install loraflow itself in editable mode on top.
# LORAFLOW_LATEST=1: the newest versions pyproject.toml allows instead, in .venv-latest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
[ "${LORAFLOW_LATEST:-0}" = 1 ] && VENV=.venv-latest
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet)
if [ "${LORAFLOW_LATEST:-0}" = 1 ]; then
    echo "[setup] installing the newest allowed versions into $VENV (CPU torch kept at the lock's)"
    "${PIP[@]}" install --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt \
        -e ".[test,quantization,gguf,sweep,docs]"
else
    echo "[setup] installing the locked versions (requirements/lock.txt) into $VENV"
    "${PIP[@]}" install -r requirements/lock.txt
    "${PIP[@]}" install --no-deps -e .
    "$VENV/bin/python" scripts/check_lock.py
fi
