# Everything runs from a local virtual environment made from pyproject.toml, with only the extras a target needs
# (one stamp file per extra). Choose the interpreter with PYTHON, e.g. `PYTHON=python3.11 make demo` (3.11+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLOOR_VENV ?= .venv-floor
# The lowest versions pyproject.toml allows for the core dependencies; `make test-floor` tests exactly these.
FLOOR_PINS := jax==0.8.1 jaxlib==0.8.1 flax==0.12.2 optax==0.2.5 orbax-checkpoint==0.12.0 etils==1.7.0 chex==0.1.88 \
	jaxtyping==0.2.36 numpy==2.0.2 opt_einsum==3.3.0
FLOOR_TESTS := tests/test_layer.py tests/test_inject.py tests/test_nnx.py tests/test_partition_merge.py \
	tests/test_checkpoint.py tests/test_errors.py tests/test_readme.py tests/test_config.py tests/test_gates.py \
	tests/test_sharding_metadata.py

.PHONY: venv run demo test test-slow test-floor bench figures lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# $(VENV)/.installed-demo, -experiments, -bench, -docs, -test: `pip install -e '.[<extra>]'` once per change of
# pyproject.toml. Each target installs only the extra it needs, so `make demo` stays a light first install.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

## The development environment: the library, experiments, benchmarks and test tools.
venv: $(VENV)/.installed-test

## A 10-second demo: adapt a frozen network to operating conditions and print what it learned. Installs only the
## library and the `demo` extra (ml_collections, absl-py, tensorboardX): no simulators.
demo: $(VENV)/.installed-demo
	$(PY) -m experiments.demo --config configs/demo.py

## The main job: every method on two tasks (configs/default.py); prints the tables, writes runs/default/.
run: $(VENV)/.installed-experiments
	$(PY) -m experiments.run --config configs/default.py --workdir runs/default

## Speed and memory ratios (quick mode); writes runs/bench/BENCHMARKS.quick.md (BENCHMARKS.md is --full's).
bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.run

## The test suite (unit tests, doctests, the README example, the docs' code blocks and build, notebooks in this venv),
## < 10 minutes on 2 CPU cores. CI (.ci/run) runs it first, then lint, test-slow, test-floor and docs.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

## Slower tests, run separately: among them every notebook through its own install cell in a fresh venv.
test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

## The core tests against the lowest supported versions (pyproject's floors), in their own venv.
test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(FLOOR_TESTS)

$(FLOOR_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet $(FLOOR_PINS) 'pytest>=8,<10' -e .
	touch $@

## The notebooks' figures for readers on GitHub: runs each notebook, writes colab/figures/<notebook>-<n>.png.
figures: $(VENV)/.installed-test
	$(PY) -m colab.figures

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## The documentation site (docs/), built from the docstrings with warnings as errors; open docs/_build/html/index.html.
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .ruff_cache *.egg-info docs/_build docs/api/generated
