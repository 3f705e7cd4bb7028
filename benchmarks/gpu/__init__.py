"""One GPU benchmark of the toolkit (README.md beside this file): run.sh -> bench.py -> a child per section."""
