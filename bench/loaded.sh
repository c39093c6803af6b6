#!/bin/bash
# Spec-Bench with both cores of a 2-core machine loaded by another process (issue 19's done-when 2):
# two busy loops (one per core) start before the engine's start-up calibration (its cache cleared
# first, so that it is timed under the load), and then
#   start: stop 150 s after the calibration's line in the bench's log;
#   whole: run until the bench ends.
# Writes OUT.out (the table), OUT.err (progress and start-up log), OUT.json, OUT.png and OUT.load
# (when the load started and stopped).
#
#   bash bench/loaded.sh start /tmp/loaded_start
#   bash bench/loaded.sh whole /tmp/loaded_whole
# Further arguments go to the bench (the last of a repeated option wins): ... --per-category 1
set -u
mode=${1:?start or whole}; out=${2:?output prefix}; shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
rm -rf "${LOGITSPEC_CACHE:-$HOME/.cache/logitspec}/calibration"
$python -c 'while True: pass' & l1=$!
$python -c 'while True: pass' & l2=$!
trap 'kill $l1 $l2 2>/dev/null' EXIT
echo "load started $(date +%T)" > "$out.load"
$python -m server.cli bench --per-category 3 --max-new-tokens 256 --json "$out.json" --plot "$out.png" \
    "$@" > "$out.out" 2> "$out.err" &
b=$!
if [ "$mode" = start ]; then
    while kill -0 $b 2>/dev/null && ! grep -q "forward cost vs tree size" "$out.err"; do sleep 1; done
    echo "calibration line seen $(date +%T)" >> "$out.load"
    sleep 150
    kill $l1 $l2 2>/dev/null
    echo "load stopped $(date +%T)" >> "$out.load"
fi
wait $b
echo "bench done $(date +%T)" >> "$out.load"
