#!/usr/bin/env bash
# Starts the server on the embedded default model at http://127.0.0.1:8000, after installing what
# serving needs into the project's .venv (once: later starts skip it; see scripts/install.sh).
# Extra arguments go to `logitspec serve` (see `logitspec serve --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/install.sh" serve
cd "$ROOT"
exec "$PY" -m server.cli serve "$@"
