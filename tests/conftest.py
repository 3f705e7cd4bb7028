"""Test-session settings shared by every test file."""
import os

# numpy's OpenBLAS with 2 threads on a shared 2-core machine makes the 2048-d eigensolvers of FID
# erratic (seconds instead of a fraction); one thread is faster and stable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
