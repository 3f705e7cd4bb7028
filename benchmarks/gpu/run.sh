#!/usr/bin/env bash
# The GPU benchmark in one command (README.md beside this file). On the device machine: installs the carried
# wheels, reassembles the carried Inception weights when both halves arrived, runs bench.py into $OUT and
# keeps its log there. Elsewhere: the same into benchmarks/results (with --quick: /tmp/srgan-gpu-bench-quick).
#   bash benchmarks/gpu/run.sh [bench.py options, e.g. --quick or --sections a_fast]
#   bash benchmarks/gpu/run.sh --stash    first call of the two-call route: keeps the weights' first half
#   bash benchmarks/gpu/run.sh --gpu-tests [bench.py options]   first the tests only a GPU runs (CUDA graph capture,
#                                         device batches' bits, SR solved on the CPU, runs sharing a process on
#                                         streams), their log beside the results
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=benchmarks/gpu/carry
STASH=/tmp/srgan-gpu-bench-stash
MEASURED_HERE=${MEASURED_HERE:-/tmp/srgan-gpu-bench-measured}  # this machine's results, for its next call
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python

if [ "${1:-}" = "--stash" ]; then
    mkdir -p "$STASH" && cp "$CARRY"/inception-1/* "$STASH"/ && ls -l "$STASH"
    exit
fi

# shellcheck source=benchmarks/gpu/wheels.sh
source benchmarks/gpu/wheels.sh
install_carried_wheels "$CARRY"/wheels  # torch-fidelity for section (c), tensorboardX for the GPU-only tests

RESULTS=${OUT:-benchmarks/results}
if [ -z "${OUT:-}" ] && [[ " $* " == *" --quick "* ]]; then
    RESULTS=/tmp/srgan-gpu-bench-quick  # a CPU's quick check is no result to commit (nor to carry to a device)
    echo "run.sh: --quick without \$OUT: the results go to $RESULTS"
fi
TESTS=()
if [ "${1:-}" = "--gpu-tests" ]; then
    shift
    TESTS_LOG=${OUT:-$RESULTS}/gpu_tests.log  # beside the results it vouches for
    rm -f "$TESTS_LOG"
    bash benchmarks/gpu/gpu_tests.sh "$TESTS_LOG"
    TESTS=(--gpu-tests-log "$TESTS_LOG")
fi

WEIGHTS=()
if [ -f "$STASH/default_1.pt.part-aa" ] && [ -f "$CARRY/inception-2/default_1.pt.part-ab" ]; then
    cat "$STASH/default_1.pt.part-aa" "$CARRY/inception-2/default_1.pt.part-ab" > /tmp/default_1.pt
    if [ "$(sha256sum /tmp/default_1.pt | cut -d' ' -f1)" = "$(cat "$CARRY/inception-2/default_1.pt.sha256")" ]; then
        WEIGHTS=(--inception-weights /tmp/default_1.pt)
    else
        echo "run.sh: the reassembled Inception weights fail their SHA-256; section (c) goes without them"
    fi
fi

LOG=/dev/null
[ -n "${OUT:-}" ] && LOG=$OUT/gpu_bench.log
mkdir -p "$RESULTS"
PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu/bench.py --out "$RESULTS" ${WEIGHTS[@]+"${WEIGHTS[@]}"} \
    ${TESTS[@]+"${TESTS[@]}"} "$@" 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
# On the device machine the results stay there too: a next call of the same session, sent while the machine is
# still warm, finds them (measure_then_study.sh 0 takes its settings from them, nothing to fold in first)
# (only results that hold section (d), what that call needs: a later run of other sections does not replace them)
for RESULT in "${OUT:-/nonexistent}"/gpu_*.json; do
    if [ -f "$RESULT" ] && "$PYTHON" -c 'import json, sys; sys.exit("d_small_models" not in json.load(open(sys.argv[1]))["sections"])' "$RESULT" 2>/dev/null; then
        mkdir -p "$MEASURED_HERE" && cp "$RESULT" "$MEASURED_HERE"/
    fi
done
exit "$STATUS"
