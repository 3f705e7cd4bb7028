#!/usr/bin/env bash
# The tests that only a GPU runs (CUDA graph capture, the device batches' bits, SR solved on the CPU, runs sharing a
# process on streams), bounded, their console appended to LOG and ended by "pytest exit N" (common.gpu_tests reads
# it). run.sh --gpu-tests and measure_then_study.sh run them before what they vouch for.
#   bash benchmarks/gpu/gpu_tests.sh LOG [WHEELS_DIR]     (WHEELS_DIR default benchmarks/gpu/carry/wheels)
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: $0 LOG [WHEELS_DIR]" >&2; exit 2; }
LOG=$1
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
# shellcheck source=benchmarks/gpu/wheels.sh
source benchmarks/gpu/wheels.sh

# Every process left in session $1 (by /proc: the GPU image may lack pkill); twice, for any started meanwhile.
kill_session() {
    local stat line pass
    for pass in 1 2; do
        for stat in /proc/[0-9]*/stat; do
            line=$(cat "$stat" 2>/dev/null) || continue
            read -r _state _ppid _group session _ <<< "${line##*) }"
            [ "$session" = "$1" ] && kill -KILL "${stat//[^0-9]/}" 2>/dev/null
        done
    done
    return 0
}

# bounded: a hang in a CUDA call would otherwise take the whole call (pytest-timeout cannot interrupt one); in a
# session of their own, so that what they started in process groups of its own (the study's train.py runs) ends
# with them instead of loading the GPU afterwards
# (killed before tee can end: what is left may hold the pipe; a call that the device tool ends meanwhile leaves
# them no longer than GPU_TESTS_S: timeout still ends pytest, and its runs are a few iterations long)
SESSION=/tmp/srgan-gpu-tests.sid
rm -f "$SESSION"
mkdir -p "$(dirname "$LOG")"
{
    install_carried_wheels "${2:-benchmarks/gpu/carry/wheels}"  # the tests that train through train.py log with tensorboardX
    setsid -w bash -c 'echo $$ > "$0"; exec timeout -k 5 "$1" "${@:2}"' "$SESSION" "${GPU_TESTS_S:-120}" \
        "$PYTHON" -m pytest -q -p no:cacheprovider --timeout=90 -k gpu \
        tests/test_step_graphs.py tests/test_device_batches.py tests/test_spectral.py tests/test_group.py
    STATUS=$?
    [ -s "$SESSION" ] && kill_session "$(cat "$SESSION")"
    echo "pytest exit $STATUS"  # 124: the timeout ended them
} 2>&1 | tee -a "$LOG"
