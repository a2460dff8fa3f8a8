#!/usr/bin/env bash
# Set up .venv from the lock and run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh            every test (unit, model and e2e tiers), with the 25 slowest listed
#                                   (one pytest-xdist worker per core; `-n 0` runs in one process)
#   bash scripts/test.sh --fast     the unit and model tiers only: what to run between two edits
#   bash scripts/test.sh --latest   every test in .venv-latest, on the newest versions pyproject.toml
#                                   allows, then what differs from requirements/lock.txt
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=all
case "${1:-}" in
    --fast) MODE=fast; shift ;;
    --latest) MODE=latest; shift ;;
esac
VENV=.venv
if [ "$MODE" = latest ]; then
    LORAFLOW_LATEST=1 bash scripts/setup.sh
    VENV=.venv-latest
else
    bash scripts/setup.sh
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PATH="$PWD/$VENV/bin:$PATH"
ARGS=(-n auto --dist loadgroup --durations=25)
[ "$MODE" = fast ] && ARGS=(-n auto --dist loadgroup -m "not e2e" --durations=10)
status=0
"$VENV/bin/python" -m pytest "${ARGS[@]}" "$@" || status=$?
if [ "$MODE" = latest ]; then
    echo "[latest] the suite exited $status on these versions:"
    "$VENV/bin/python" scripts/check_lock.py --report
fi
exit "$status"
