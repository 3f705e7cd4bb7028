"""Studies: many train.py runs (settings x arms x seeds, branches) run in resumable chunks (`python -m source.study`)."""
