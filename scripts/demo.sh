#!/usr/bin/env bash
# The main job end to end on the offline defaults: set up .venv, fine-tune the built-in model
# with `mlflow run`, then load the logged model back and generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
export TOKENIZERS_PARALLELISM=false
mlflow run . -P r=16 --env-manager local "$@"
python examples/load_and_generate.py
