#!/usr/bin/env bash
# Stress check for the GUI: run the GUI test files N times while two busy processes load
# both cores, and count crashes (a signal or an abort: exit status >= 128, or pytest's
# "Fatal Python error"/"malloc" messages) apart from plain test failures (exit status 1).
#
#   bench/gui_stress.sh [N] [test files...]        (from the repository root)
#   N defaults to 10; files default to tests/test_gui_*.py
#
# Prints one line per run and a summary "runs=N crashes=C failures=F". Logs go to
# ${LOG_DIR:-/tmp/gui_stress}/run<i>.log. Needs xvfb-run.
set -u
N=${1:-10}
shift || true
FILES=("$@")
[ ${#FILES[@]} -eq 0 ] && FILES=(tests/test_gui_*.py)
PY=${PY:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-/tmp/gui_stress}
mkdir -p "$LOG_DIR"

busy=()
for _ in 1 2; do
  "$PY" -c "while True: pass" &
  busy+=($!)
done
cleanup() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

crashes=0; failures=0
for i in $(seq 1 "$N"); do
  log="$LOG_DIR/run$i.log"
  t0=$(date +%s)
  xvfb-run -a -s "-screen 0 1280x1024x24" "$PY" -X faulthandler -m pytest -q -p no:cacheprovider \
    "${FILES[@]}" >"$log" 2>&1
  rc=$?
  t1=$(date +%s)
  kind=ok
  if [ $rc -ge 128 ] || grep -qE "Fatal Python error|malloc|double free|corrupted|Segmentation fault|Aborted" "$log"; then
    kind=CRASH; crashes=$((crashes + 1))
  elif [ $rc -ne 0 ]; then
    kind=fail; failures=$((failures + 1))
  fi
  echo "run $i: rc=$rc $kind $((t1 - t0)) s  $(tail -n 1 "$log")"
done
echo "runs=$N crashes=$crashes failures=$failures"
