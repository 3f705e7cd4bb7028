#!/usr/bin/env bash
# One lent GPU call that measures, then uses what it measured (README.md beside this file): the GPU-only tests and
# section (d) of the benchmark, then one chunk of a study with the settings that (d) measured best
# (study_settings.py: step graphs, runs per process, SR on the CPU; each only where measured better and agreeing).
#   bash benchmarks/gpu/measure_then_study.sh D_BUDGET STUDY CHUNK_BUDGET [source.study device options]
# e.g. 240 configs/collapse/gpu_study.yaml 150 --setting b64, with carry [".study_carry", "benchmarks/gpu/carry/wheels"]
# D_BUDGET 0: nothing measured, the settings from the committed results (RESULTS=, needed where benchmarks/results
# holds several devices' files), the whole call for the chunk. The chunk trains CHUNK_BUDGET seconds at most, less
# where the call (CALL_S, default 590 s: the device tool's timeout_s) would otherwise end before it has packed.
# STUDY_CARRY: the folder `source.study carry` filled (default .study_carry); RUN_SH replaces benchmarks/gpu/run.sh
# (a test's stand-in).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { echo "usage: $0 D_BUDGET STUDY CHUNK_BUDGET [source.study device options]" >&2; exit 2; }
D_BUDGET=$1 STUDY=$2 CHUNK_BUDGET=$3
shift 3
STARTED=$(date +%s)
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
PARTS=4  # the chunk's share of the 8 files a call returns
if [ "$D_BUDGET" = 0 ]; then
    RESULT=${RESULTS:-}
    if [ -z "$RESULT" ]; then
        mapfile -t FOUND < <(ls benchmarks/results/gpu_*.json 2>/dev/null | grep -v -- -quick)
        [ ${#FOUND[@]} -eq 1 ] || { echo "measure_then_study: ${#FOUND[@]} committed results; name one: RESULTS=..." >&2; exit 2; }
        RESULT=${FOUND[0]}
    fi
else
    bash "${RUN_SH:-benchmarks/gpu/run.sh}" --gpu-tests --sections d_small_models --budget d_small_models="$D_BUDGET"
    RESULT=$(ls "$OUT"/gpu_*.json 2>/dev/null | head -1)
    if grep -qE "[0-9]+ (failed|errors?)" "$OUT/gpu_tests.log" 2>/dev/null; then
        echo "measure_then_study: GPU-only tests failed (gpu_bench.log): the chunk runs with its base settings"
        RESULT=none
    fi
    # the tests' log joins the benchmark's: the benchmark returns 3 files, the chunk at most 2 parts, its manifest,
    # progress and left_out.txt: 8
    if [ -f "$OUT/gpu_tests.log" ]; then
        cat "$OUT/gpu_tests.log" >> "$OUT/gpu_bench.log" && rm "$OUT/gpu_tests.log"
    fi
    PARTS=2
fi
SETTINGS=$("$PYTHON" -m benchmarks.gpu.study_settings "${RESULT:-none}")
LEFT=$(( ${CALL_S:-590} - ($(date +%s) - STARTED) - 150 ))  # 150: the grace, unpacking and packing
BUDGET=$(( LEFT < CHUNK_BUDGET ? LEFT : CHUNK_BUDGET ))
if [ "$BUDGET" -lt 30 ]; then
    echo "measure_then_study: ${BUDGET} s left for the chunk; none started (the measurements are in \$OUT)"
    exit 0
fi
echo "measure_then_study: the chunk trains ${BUDGET} s with: ${SETTINGS:-its base settings}"
# shellcheck disable=SC2086  # the settings are words to split
PYTHONUNBUFFERED=1 "$PYTHON" -m source.study device "$STUDY" --carry "${STUDY_CARRY:-.study_carry}" --out "$OUT" \
    --budget "$BUDGET" --grace 60 --parts "$PARTS" $SETTINGS "$@"
