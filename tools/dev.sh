#!/usr/bin/env bash
# One entry point for the README's two commands, on a fresh machine:
#   bash tools/dev.sh main   -> the main job
#   bash tools/dev.sh test   -> the test suite
#   bash tools/dev.sh docs   -> the API reference, generated from the docstrings (out/api)
# Creates ./.venv (once) and installs the project with its pinned dependencies; installs
# again when setup.cfg (the dependency list) changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TF_FUSION_VENV:-.venv}
STAMP="$VENV/.tf_fusion-setup.cfg.sha256"
want=$(sha256sum setup.cfg | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] \
    || ! "$VENV/bin/python" -c "import tf_fusion, pytest, xdist, ruff, matplotlib, sklearn, tensorboard, tensorflow_datasets, pdoc" 2>/dev/null; then
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
    # The ImageNet recipe on generated ImageNet-format data: ResNet-50 v1.5 on 4 logical
    # CPU replicas, LARS + warm-up + poly(2), bf16 compute, FP16 gradients on the wire,
    # the weight update sharded over the replicas (1.17x the replicated update on this
    # machine, docs/sharded_update.md). Extra arguments override these flags.
    DATA=out/fake_imagenet
    if [ ! -f "$DATA/validation-00001-of-00002" ]; then
      "$VENV/bin/python" -m tools.make_fake_imagenet --out_dir "$DATA" --num_train 1024 \
          --num_validation 256 --num_classes 10
    fi
    MODEL_DIR=out/main_job/$(date +%Y%m%d-%H%M%S)
    echo "[dev] TensorBoard logs in $MODEL_DIR: tensorboard --logdir $MODEL_DIR" >&2
    exec "$VENV/bin/python" -m official_recipes.imagenet.main --model=resnet50 \
        --data_dir="$DATA" --num_classes=10 --image_size=32 --batch_size=64 --epochs=8 \
        --optimizer=lars --learning_rate=4 --warmup_epochs=1 --dtype=bf16 --compression=fp16 \
        --pack_bytes=auto --autotune=measure \
        --all_reduce_alg=auto --weight_update=sharded --num_devices=4 \
        --epochs_between_evals=2 --log_steps=16 \
        --model_dir="$MODEL_DIR" "$@" ;;
  test)
    # The linter first (seconds): undefined or unused names fail the run.
    "$VENV/bin/ruff" check --quiet .
    # Two test processes (pytest-xdist), a test class to a process: much of a test's
    # time is TensorFlow tracing in one Python thread, so two processes share the
    # cores better than one. TF_FUSION_TEST_PROCESSES=1 runs them in this process.
    procs=${TF_FUSION_TEST_PROCESSES:-2}
    if [ "$procs" -gt 1 ]; then
      exec "$VENV/bin/python" -m pytest -q -n "$procs" --dist loadscope "$@"
    fi
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  docs)
    # HTML from the docstrings of the public modules (pdoc, Google style); open
    # out/api/index.html. tests/test_api_docs.py renders the same modules.
    exec "$VENV/bin/python" -m tools.api_docs --out_dir out/api "$@" ;;
  *)
    echo "usage: bash tools/dev.sh main|test|docs [args...]" >&2; exit 2 ;;
esac
