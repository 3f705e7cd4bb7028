#!/usr/bin/env bash
# One lent GPU call that measures, then uses what it measured (README.md beside this file): the GPU-only tests and
# section (d) of the benchmark, then one chunk of a study with the settings that (d) measured best
# (study_settings.py: step graphs, runs per process, SR on the CPU; each only where measured better and agreeing).
#   bash benchmarks/gpu/measure_then_study.sh D_BUDGET STUDY CHUNK_BUDGET [source.study device options]
# e.g. 240 configs/collapse/gpu_study.yaml 150 --setting b64, with carry [".study_carry", "benchmarks/gpu/carry/wheels"]
# D_BUDGET 0: nothing measured, the settings from results measured before (RESULTS=; else what an earlier call of
# this session measured on this machine, while it is still warm (run.sh leaves its results in MEASURED_HERE); else
# the file of this machine's GPU in RESULTS_DIR, default benchmarks/results, else the only one there), the call for
# the GPU-only tests (some 25 s: they vouch for this code on this machine, the results' own for theirs) and the chunk.
# Either way study_settings.py uses only what the same benchmark run recorded as measured better, with the GPU-only
# tests passed there and here. The chunk trains CHUNK_BUDGET seconds at most ("auto": as long as the call allows;
# fractions are dropped), less where the call (CALL_S, default 590 s: give the device tool's timeout_s) would
# otherwise end before it has packed (90 s kept back). Its console goes to $OUT/chunk.log too (with D_BUDGET: to gpu_bench.log).
# STUDY_CARRY: the folder `source.study carry` filled (default .study_carry; its wheels serve the GPU-only tests too);
# RUN_SH and GPU_TESTS_SH replace benchmarks/gpu/run.sh and gpu_tests.sh (a test's stand-ins).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { echo "usage: $0 D_BUDGET STUDY CHUNK_BUDGET [source.study device options]" >&2; exit 2; }
[ -n "${OUT:-}" ] || { echo "$0: \$OUT must name the folder the device call returns" >&2; exit 2; }
D_BUDGET=$1 STUDY=$2 ASKED=$3 CHUNK_BUDGET=${3%.*}
shift 3
[ "$CHUNK_BUDGET" = auto ] && CHUNK_BUDGET=100000
case "$CHUNK_BUDGET" in ''|*[!0-9]*) echo "$0: CHUNK_BUDGET must be seconds or auto, not $ASKED" >&2; exit 2;; esac
CHUNK_BUDGET=$((10#$CHUNK_BUDGET))  # 0600 is 600 s, not octal
MEASURED_HERE=${MEASURED_HERE:-/tmp/srgan-gpu-bench-measured}
STARTED=$(date +%s)
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
PARTS=4  # the chunk's share of the 8 files a call returns
CHUNK_LOG=$OUT/chunk.log
if [ "$D_BUDGET" = 0 ]; then
    RESULT=(--dir "${RESULTS_DIR:-benchmarks/results}")  # study_settings.py picks the file of this machine's GPU
    ls "$MEASURED_HERE"/gpu_*.json >/dev/null 2>&1 && RESULT=(--dir "$MEASURED_HERE")
    [ -n "${RESULTS:-}" ] && RESULT=("$RESULTS")
    echo "measure_then_study: the settings from ${RESULT[*]}, if the GPU-only tests pass here"
    mkdir -p "$(dirname "$CHUNK_LOG")" && rm -f "$CHUNK_LOG"
    bash "${GPU_TESTS_SH:-benchmarks/gpu/gpu_tests.sh}" "$CHUNK_LOG" "${STUDY_CARRY:-.study_carry}/wheels"
    RESULT+=(--tests-log "$CHUNK_LOG")  # the chunk's console follows the tests' in its log
else
    bash "${RUN_SH:-benchmarks/gpu/run.sh}" --gpu-tests --sections d_small_models --budget d_small_models="$D_BUDGET"
    MEASURED=$(ls "$OUT"/gpu_*.json 2>/dev/null | head -1)
    RESULT=("${MEASURED:-none}")
    # the tests' log joins the benchmark's: the benchmark returns 3 files, the chunk at most 2 parts, its manifest,
    # progress and left_out.txt: 8
    if [ -f "$OUT/gpu_tests.log" ]; then
        cat "$OUT/gpu_tests.log" >> "$OUT/gpu_bench.log" && rm "$OUT/gpu_tests.log"
    fi
    PARTS=2
    CHUNK_LOG=$OUT/gpu_bench.log  # the 8 files are taken
fi
SETTINGS=$("$PYTHON" -m benchmarks.gpu.study_settings "${RESULT[@]}")
# kept back: the runs' grace to stop (they stopped 1.9 s after SIGTERM in the first H200 chunk), unpacking (3 s),
# packing (15 s for 12 runs) and 40 s of margin
GRACE=30
LEFT=$(( ${CALL_S:-590} - ($(date +%s) - STARTED) - GRACE - 60 ))
BUDGET=$(( LEFT < CHUNK_BUDGET ? LEFT : CHUNK_BUDGET ))
if [ "$BUDGET" -lt 30 ]; then
    echo "measure_then_study: ${BUDGET} s left for the chunk; none started (the measurements are in \$OUT)"
    exit 0
fi
echo "measure_then_study: the chunk trains ${BUDGET} s with: ${SETTINGS:-its base settings}"
# shellcheck disable=SC2086  # the settings are words to split
PYTHONUNBUFFERED=1 "$PYTHON" -m source.study device "$STUDY" --carry "${STUDY_CARRY:-.study_carry}" --out "$OUT" \
    --budget "$BUDGET" --grace "$GRACE" --parts "$PARTS" $SETTINGS "$@" 2>&1 | (trap '' TERM INT HUP; exec tee -a "$CHUNK_LOG")  # a signal to
exit "${PIPESTATUS[0]}"  # the call must not end tee first: the chunk still prints while it stops and packs
