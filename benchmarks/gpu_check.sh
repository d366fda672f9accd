#!/usr/bin/env bash
# One prepared check on one GPU, at most ~9 minutes: the CUDA tests, the step benchmark on CUDA
# (eager, torch.compile, torch.compile + CUDA graphs) and `lcp run-table 1 --quick --seeds 0`,
# then one summary. Run from the repository root with the project's environment active:
#
#     bash benchmarks/gpu_check.sh            # on a machine with a CUDA device
#     bash benchmarks/gpu_check.sh --dry-run  # anywhere: print the plan, check the pieces parse
#
# Each stage has its own time limit (seconds, below); the budget is their sum, 520 s. It has not
# run on a GPU yet (docs/speed.md). Logs and
# JSON go to $GPU_CHECK_OUT (default: a new temporary folder). Exit status: 0 when every stage
# passed, 1 otherwise (the summary says which).
set -uo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t lcp-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
# the controller rows, and LF's noisy phase and EBD's descent on both models (docs/speed.md,
# "On a GPU: the plan")
ROWS="t1-ff-lcp-di,t1-rnn-lcp-di,t1-ff-lcp-kp,t1-ff-lcp-lf,t1-rnn-lcp-lf,t1-ff-lcp-ebd,t1-rnn-lcp-ebd"
SUMMARY=()
FAILED=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    if [ "$DRY" = 1 ]; then
        echo "[plan] $name (≤ ${limit}s): $*"
        return 0
    fi
    local start=$SECONDS
    echo "== $name: $*"
    timeout --signal=INT "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$? took=$((SECONDS - start))
    tail -n 25 "$OUT/$name.log"
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok      $name (${took}s)")
    else
        [ $rc -eq 124 ] && rc="timeout after ${limit}s"
        SUMMARY+=("FAILED  $name (${took}s, exit $rc; log $OUT/$name.log)")
        FAILED=1
    fi
}

if [ "$DRY" = 1 ]; then
    # the pieces parse and their options exist, without a GPU
    bash -n "$0" || exit 1
    "$PY" -m pytest -q --collect-only -m cuda tests/test_compiled.py >/dev/null || exit 1
    "$PY" benchmarks/step_time.py --help >/dev/null || exit 1
    "$PY" -m cli run-table --help >/dev/null 2>&1 || lcp run-table --help >/dev/null || exit 1
else
    "$PY" - <<'EOF' || { echo "gpu_check: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False); run it on a GPU machine or use --dry-run"; exit 1; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        | sed 's/^/# GPU: /'
fi

stage cuda-tests 100 "$PY" -m pytest -q -m cuda tests/test_compiled.py
for mode in 0 1 graphs; do
    stage "steps-compile-$mode" 100 env LCP_COMPILE="$mode" "$PY" benchmarks/step_time.py \
        --device cuda --only "$ROWS" --repeats 5 --warmup 2 --max-seconds 10 \
        --json "$OUT/steps-compile-$mode.json"
done
stage run-table-quick 120 lcp run-table 1 --quick --seeds 0 \
    --runs-dir "$OUT/lcp-runs" --tracking-uri "sqlite:///$OUT/mlflow.db"

[ "$DRY" = 1 ] && { echo "gpu_check: dry run: the plan above parses; nothing was run"; exit 0; }

echo
echo "== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rows = {}
for mode in ("0", "1", "graphs"):
    path = Path(sys.argv[1]) / f"steps-compile-{mode}.json"
    if path.exists():
        for row in json.loads(path.read_text()).get("rows", []):
            rows.setdefault(row["id"], {})[mode] = row.get("ms")
if rows:
    print(f"{'row':28} {'eager ms':>9} {'compiled':>9} {'graphs':>9}")
    for rid, by_mode in rows.items():
        cells = [by_mode.get(m) for m in ("0", "1", "graphs")]
        print(f"{rid:28} " + " ".join(f"{c:9.2f}" if c is not None else f"{'-':>9}" for c in cells))
EOF
exit $FAILED
