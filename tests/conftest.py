"""Test-session settings shared by every test file."""
import importlib
import os

# numpy's OpenBLAS with 2 threads on a shared 2-core machine makes the 2048-d eigensolvers of FID
# erratic (seconds instead of a fraction); one thread is faster and stable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist (make test) each worker takes its share of the cores, and so do the processes it starts:
# two workers of two threads each on two cores oversubscribe them.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


import pytest  # noqa: E402
import torch  # noqa: E402

from source.provenance import CODE_ENV  # noqa: E402


def pytest_configure(config):
    """matplotlib builds its font cache at its first use on a machine and says so on stderr when that takes over 5 s
    (a fresh, loaded CI machine): built here once, before the xdist workers and the figure commands whose stderr the
    tests read line by line."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        importlib.import_module("matplotlib.font_manager")


@pytest.fixture(autouse=True)
def no_carried_code(monkeypatch):
    """No test sees a carried code version it did not set (the study's device command sets it in its process)."""
    monkeypatch.setenv(CODE_ENV, "")


@pytest.fixture(scope="session")
def full_inception_weights(tmp_path_factory):
    """A complete torch-fidelity weights file, as users download it, built offline.

    The real pool3 weights (fid-helper's copy, converted) plus a seeded random logits layer: it
    exercises every code path of the full file (IS included) with features identical to fid-helper's.
    """
    from source.metrics import inception

    state = inception.convert_fid_helper_weights()
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=generator)
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
    torch.save(state, path)
    return path


@pytest.fixture
def ranks_threads():
    """One thread, as the spawned DDP ranks run: a single-process reference then sums in their order (with two
    threads, Adam turned the reordering's rounding into parts of a step on an AVX-512 Xeon)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine run many times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
