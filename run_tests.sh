#!/usr/bin/env bash
# Sets up a virtual environment (.venv, or $VENV) with everything the tests need,
# then runs the suite once per Keras backend, each in its own process.
# Usage: bash run_tests.sh [pytest args]   (BACKENDS="jax torch" to pick backends)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"

# Two pytest workers (pytest-xdist) per backend share the 2 cores. In the TensorFlow
# and PyTorch runs each worker computes on one thread (tests/conftest.py) and runs
# whole test modules, the longest first (`--dist loadscope`); the JAX run, faster
# with XLA's own threads, shares the tests out in chunks (`--dist load`).
# TEST_WORKERS overrides the count; 0 runs in-process.
WORKERS=${TEST_WORKERS:-2}

failed=""
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    if [ "$backend" = jax ]; then
        dist=(--dist load)
    else
        dist=(--dist loadscope --no-loadscope-reorder)
    fi
    KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider -n "$WORKERS" "${dist[@]}" --durations=15 "$@" \
        || failed="$failed $backend"
done
if [ -n "$failed" ]; then
    echo "test failures on:$failed"
    exit 1
fi
echo "all backends passed"
