# Sourced by run.sh and gpu_tests.sh: install_carried_wheels DIR installs the carried wheels in DIR (torch-fidelity,
# tensorboardX: the GPU image lacks both) without any registry, unless they are importable already, and exports the
# PYTHONPATH that finds them. (find_spec: importing them to find out would take seconds of the call) It also exports
# SRGAN_CODE: the code version prepare.sh recorded beside the wheels, checked against this copy of the code (which
# has no .git on a lent machine), for the results to name (source/provenance.py).
install_carried_wheels() {
    if [ -z "${SRGAN_CODE:-}" ] && [ -f "$1/code.json" ]; then
        export SRGAN_CODE; SRGAN_CODE=$("$PYTHON" -m source.provenance verify "$1/code.json" || true)
    fi
    local installed="import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch_fidelity', 'tensorboardX'))))"
    "$PYTHON" -c "$installed" 2>/dev/null && return 0
    if ! ls "$1"/*.whl >/dev/null 2>&1; then  # said: what needs them then fails, and the reason should be in the log
        echo "wheels.sh: torch-fidelity or tensorboardX missing and no wheels in $1 (bash benchmarks/gpu/prepare.sh)"
        return 0
    fi
    # only the files source/study/gpu_wheels.txt pins by hash: a wheel's files could run code at every Python start
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/srgan-gpu-bench-site --find-links "$1" -r source/study/gpu_wheels.txt \
        && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/srgan-gpu-bench-site \
        || echo "wheels.sh: the wheels in $1 are not those source/study/gpu_wheels.txt pins by hash (pip said why); run bash benchmarks/gpu/prepare.sh again"
}
