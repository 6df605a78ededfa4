# Quick start:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,train]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m rwkvkit demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
