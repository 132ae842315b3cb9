# Everything runs from a local virtual environment made from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv run demo test test-slow bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## The main job: every method on every task (configs/default.py); prints the tables, writes runs/default/.
run: venv
	$(PY) -m experiments.run --config configs/default.py --workdir runs/default

## A 10-second demo: adapt a frozen network to operating conditions and print what it learned.
demo: venv
	$(PY) -m experiments.demo --config configs/demo.py

## Speed and memory ratios (quick mode); writes BENCHMARKS.md.
bench: venv
	$(PY) -m benchmarks.run

## The test suite (unit tests + doctests), < 10 minutes on 2 CPU cores.
test: venv
	$(PY) -m pytest -q -m "not slow"

## Slower tests, run separately.
test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
