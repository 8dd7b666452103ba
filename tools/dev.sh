#!/usr/bin/env bash
# One entry point for the README's two commands, on a fresh machine:
#   bash tools/dev.sh main   -> the main job
#   bash tools/dev.sh test   -> the test suite
# Creates ./.venv (once) and installs the project with its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TF_FUSION_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import tf_fusion, pytest, matplotlib" 2>/dev/null; then
  echo "[dev] creating $VENV and installing tf_fusion with its pinned dependencies" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[test,tools]"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
cmd=${1:-}
shift || true
case "$cmd" in
  main)
    exec "$VENV/bin/python" tools/allreduce_bench.py --out_dir out/allreduce_bench "$@" ;;
  test)
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *)
    echo "usage: bash tools/dev.sh main|test [args...]" >&2; exit 2 ;;
esac
