#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what the tests need into the project's .venv
# (and, as root, Debian's test tools; see scripts/install.sh), then runs pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/install.sh" test
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
