#!/usr/bin/env bash
# The GPU check: one prepared script for the day a GPU machine is lent (at most 8 minutes there,
# no internet, at most 64 MiB carried per call). `--dry-run` runs the same steps on the CPU with a
# tiny model; CI runs that.
#
#   bash bench/gpu_check.sh            # on a CUDA machine, from the repository root
#   bash bench/gpu_check.sh --dry-run  # anywhere
#
# Steps: (1) the CUDA tests (tests/test_cuda_devices.py runs the engine on the GPU when there is
# one, and its device checks on torch's meta device everywhere); (2) bench/gpu_bench.py: copy
# bandwidth and the bandwidth limit, forwards of 1 to 64 tokens, batched against per-sequence
# attention, torch.compile, engine ar / logitspec and transformers generate on a random
# Llama-3-8B-shaped bf16 model made on the device; (3) the Spec-Bench subset (1 question per
# category) on the default model, when it loads there.
#
# The default model on a machine without the internet: its GGUF file (98 MB) travels in two
# halves in consecutive calls (split -n 2 "$GGUF" .gpu/smollm2.gguf.part-, each call carrying
# one half and moving it out of the tree, e.g. to /tmp, the second joining them), with the gguf
# package as a wheel; then LOGITSPEC_MODEL=/tmp/smollm2.gguf bash bench/gpu_check.sh. Without
# it, step 3 is skipped and says so.
#
# Output: the figures on stdout and JSON under $OUT (the device tool's folder) or out/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DEST=${OUT:-out/gpu_check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, time and report one step; keep going on failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc = 0 ] || failed=1
}

if [ $DRY = 0 ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu_check: no CUDA device here (bash bench/gpu_check.sh --dry-run runs on a CPU)"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  DEVICE=cuda; BENCH_ARGS=(--compile); SPEC_ARGS=(--max-new-tokens 128)
else
  # Two single-turn questions of 8 tokens: the step runs, in seconds.
  "$PY" - "$DEST/dry_questions.jsonl" <<'PYEOF'
import json, sys
from decoding.specbench import DEFAULT_DATA
rows = [json.loads(line) for line in DEFAULT_DATA.read_text().splitlines() if line.strip()]
with open(sys.argv[1], "w") as f:
    for category in ("qa", "translation"):
        q = next(r for r in rows if r["category"] == category)
        f.write(json.dumps(dict(q, turns=q["turns"][:1])) + "\n")
PYEOF
  DEVICE=cpu; BENCH_ARGS=(--dry-run --compile); SPEC_ARGS=(--max-new-tokens 8 --data "$DEST/dry_questions.jsonl")
fi
"$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

step "CUDA tests" 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_devices.py tests/test_model.py
step "random Llama-3-8B-shaped model (gpu_bench)" 240 "$PY" bench/gpu_bench.py "${BENCH_ARGS[@]}" \
  --json "$DEST/gpu_bench.json"
if "$PY" -c 'from decoding.loader import load; import os; load(os.environ.get("LOGITSPEC_MODEL"))' >/dev/null 2>&1; then
  step "Spec-Bench, 1 question per category, default model" 240 "$PY" -m server.cli bench \
    ${LOGITSPEC_MODEL:+--model "$LOGITSPEC_MODEL"} --device "$DEVICE" --per-category 1 "${SPEC_ARGS[@]}" \
    --json "$DEST/specbench.json"
else
  echo "== Spec-Bench: skipped, the default model does not load here (see the header for carrying it)"
fi
echo "gpu_check: $([ $failed = 0 ] && echo passed || echo FAILED) ($([ $DRY = 1 ] && echo dry run on the CPU || echo "$DEVICE")); JSON in $DEST"
exit $failed
