#!/usr/bin/env bash
# One entry point for the README's two commands, on a fresh machine:
#   bash tools/dev.sh main   -> the main job
#   bash tools/dev.sh test   -> the test suite
# Creates ./.venv (once) and installs the project with its pinned dependencies; installs
# again when setup.cfg (the dependency list) changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TF_FUSION_VENV:-.venv}
STAMP="$VENV/.tf_fusion-setup.cfg.sha256"
want=$(sha256sum setup.cfg | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] \
    || ! "$VENV/bin/python" -c "import tf_fusion, pytest, matplotlib, sklearn" 2>/dev/null; then
  echo "[dev] setting up $VENV: tf_fusion with its pinned dependencies" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[test,tools]"
  echo "$want" > "$STAMP"
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
