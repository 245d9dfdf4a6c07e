#!/usr/bin/env bash
# GPU check (issue 13): the bundled example's eval, merge --lambda auto and search-mask (enmp and nsc) on
# cuda:0 and on cpu; checks the same tables for the same seed and accuracies within one example per task,
# prints seconds per generation and peak GPU memory. About 3-6 minutes on one GPU (at most 8: it stops there).
#
#   benchmarks/gpu_check.sh                 # the report goes to gpu_check/ (or $OUT/gpu_check/ when OUT is set)
#   PYTHON=python3 benchmarks/gpu_check.sh  # another interpreter than .venv/bin/python
#   benchmarks/gpu_check.sh --generations 10 --val-limit 512   # more work (flags of benchmarks/gpu_check.py)
#
# Needs torch with CUDA (the CPU wheel of constraints.txt has none: pip install torch from the CUDA index).
# Also runs the tests marked cuda (tests/test_cuda.py). Exit status: 0 all checks pass, 1 a check failed,
# 2 no GPU, 124 out of time.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
RESULTS=${OUT:+$OUT/gpu_check}
RESULTS=${RESULTS:-gpu_check}
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
started=$(date +%s)
left() { echo $((LIMIT_S - ($(date +%s) - started))); }

"$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
    sys.exit(2)
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
EOF
mkdir -p "$RESULTS"  # (after the check: a machine without a GPU gets nothing written)

# The bundled example (built once, ~3 minutes on 2 cores; skipped when up to date).
timeout "$(left)" "$PYTHON" -m examples.bundled.build 2>&1 | tail -n 2

set +e
timeout "$(left)" "$PYTHON" benchmarks/gpu_check.py --work "$RESULTS/work" --json "$RESULTS/gpu_check.json" "$@" \
    2>&1 | tee "$RESULTS/gpu_check.txt"
status=${PIPESTATUS[0]}
set -e

if [ "$(left)" -gt 30 ]; then
    timeout "$(left)" "$PYTHON" -m pytest tests/test_cuda.py -q -m cuda 2>&1 | tail -n 15 | tee "$RESULTS/test_cuda.txt" || status=1
fi
echo "gpu_check: exit $status, $(($(date +%s) - started)) s; results in $RESULTS/"
exit "$status"
