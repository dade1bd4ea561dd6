# The two commands of the README: `make quickstart` and `make test`. Everything installs from
# pyproject.toml with the pins in constraints.txt into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-fast typecheck lint bench readme-table clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# UserWarning: the build backend's note on editable installs, which pip 26 prints as 8 lines
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/rayrcm quickstart

test: install typecheck
	$(PY) -m pytest -q

typecheck: install
	$(VENV)/bin/mypy

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/certify_engine.py

readme-table: install  # rerun the quickstart in a fresh folder and write its tables into README.md
	$(PY) -m rayrcm.quickstart README.md

clean:
	rm -rf rayrcm_results mlflow.db .pytest_cache
