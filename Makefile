# The two commands of the README: `make quickstart` and `make test`. Everything installs from
# pyproject.toml with the pins in constraints.txt into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/rayrcm quickstart

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/certify_engine.py

clean:
	rm -rf rayrcm_results mlflow.db .pytest_cache
