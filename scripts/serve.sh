#!/usr/bin/env bash
# Starts the server on the embedded default model at http://127.0.0.1:8000 (installs first if needed).
# Extra arguments go to `logitspec serve` (see `logitspec serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m server.cli serve "$@"
