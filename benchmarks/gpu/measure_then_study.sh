#!/usr/bin/env bash
# One lent GPU call that measures, then uses what it measured (README.md beside this file): the GPU-only tests and
# section (d) of the benchmark, then one chunk of a study with the settings that (d) measured best
# (study_settings.py: step graphs, runs per process, SR on the CPU; each only where measured better and agreeing).
#   bash benchmarks/gpu/measure_then_study.sh D_BUDGET STUDY CHUNK_BUDGET [source.study device options]
# D_BUDGET 0: nothing measured, the settings from the committed results (RESULTS, or the newest
# benchmarks/results/gpu_*.json), the whole call for the chunk.
# e.g. 240 configs/collapse/gpu_study.yaml 150 --setting b64, with carry [".study_carry", "benchmarks/gpu/carry/wheels"]
# STUDY_CARRY: the folder `source.study carry` filled (default .study_carry); RUN_SH replaces benchmarks/gpu/run.sh
# (a test's stand-in).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { echo "usage: $0 D_BUDGET STUDY CHUNK_BUDGET [source.study device options]" >&2; exit 2; }
D_BUDGET=$1 STUDY=$2 CHUNK_BUDGET=$3
shift 3
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
if [ "$D_BUDGET" = 0 ]; then  # measured before: the committed results (the newest, or RESULTS), no tests
    RESULT=${RESULTS:-$(ls -t benchmarks/results/gpu_*.json 2>/dev/null | grep -v quick | head -1)}
else
    bash "${RUN_SH:-benchmarks/gpu/run.sh}" --gpu-tests --sections d_small_models --budget d_small_models="$D_BUDGET"
    # 8 files come back: the tests' log joins the benchmark's, which leaves the chunk its parts, manifest, progress
    if [ -f "$OUT/gpu_tests.log" ]; then
        cat "$OUT/gpu_tests.log" >> "$OUT/gpu_bench.log" && rm "$OUT/gpu_tests.log"
    fi
    RESULT=$(ls "$OUT"/gpu_*.json 2>/dev/null | head -1)
fi
SETTINGS=$("$PYTHON" -m benchmarks.gpu.study_settings "${RESULT:-none}")
echo "measure_then_study: the chunk runs with: ${SETTINGS:-its base settings}"
# shellcheck disable=SC2086  # the settings are words to split
PYTHONUNBUFFERED=1 "$PYTHON" -m source.study device "$STUDY" --carry "${STUDY_CARRY:-.study_carry}" --out "$OUT" \
    --budget "$CHUNK_BUDGET" --grace 60 $SETTINGS "$@"
