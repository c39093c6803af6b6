# Sourced by the other scripts: picks the Python that installs and runs logitspec, puts its bin
# folder first on PATH, and sets ROOT (the checkout) and PY (the interpreter).
#   - An active virtual environment ($VIRTUAL_ENV) is used as it is.
#   - LOGITSPEC_NO_VENV=1 uses ${PYTHON:-python3} itself: a container or a Python you manage. (Debian's
#     and Ubuntu's system Python refuse pip installs outside a virtual environment: PEP 668.)
#   - Else the project's own .venv, created with ${PYTHON:-python3} -m venv when it is missing.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_logitspec_need_python() {  # $1: an interpreter; exits unless it is Python 3.10 or newer
  if ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "logitspec: needs Python 3.10 or newer; $1 is $("$1" --version 2>&1 || echo 'not there')" \
         "(set PYTHON=/path/to/python3.x)" >&2
    exit 1
  fi
}

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  if [ ! -x "$PY" ]; then
    echo "logitspec: VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: deactivate it or create it again" >&2
    exit 1
  fi
elif [ "${LOGITSPEC_NO_VENV:-0}" = 1 ]; then
  PY=$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")
else
  VIRTUAL_ENV="$ROOT/.venv"
  PY="$VIRTUAL_ENV/bin/python"
  if [ ! -x "$PY" ]; then
    base=${PYTHON:-python3}
    _logitspec_need_python "$base"
    echo "[logitspec] creating the project's virtual environment .venv ($("$base" --version 2>&1))" >&2
    if ! err=$("$base" -m venv "$VIRTUAL_ENV" 2>&1); then
      rm -rf "$VIRTUAL_ENV"  # half made (no pip): the next run must not take it for a working one
      echo "$err" >&2
      echo "logitspec: '$base -m venv' failed: this Python lacks its venv module (ensurepip)." \
           "On Debian or Ubuntu: apt install python3-venv (as root), then run this again;" \
           "or activate a virtual environment of your own first." >&2
      exit 1
    fi
  fi
  export VIRTUAL_ENV
fi
_logitspec_need_python "$PY"
[ -n "${VIRTUAL_ENV:-}" ] && export PATH="$VIRTUAL_ENV/bin:$PATH"  # logitspec and the test tools
