# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv with a Python >= 3.12 (PATH first, then pyenv's versions) and install the project.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# the CPU tests compile many small programs: LLVM's optimisation passes off (same HLO, same numerics up to
# fp contraction) take about a third off the suite's time on 2 cores; the GPU tests never see this
# and many tests build fresh closures over the same computations: a persistent compilation cache (empty
# in a clean clone) lets both pytest workers reuse each other's identical programs (2 cores, the delta-rule
# Pallas and softmax-sp test files: 346 s → 269 s from an empty cache); it persists between local runs
# (`make clean` empties it)
JAX_CACHE := JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
TEST_DEVICES := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" JAX_PLATFORMS=cpu $(JAX_CACHE)
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow lint format clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@python=$$(tools/find_python.sh) || exit 1; \
	echo "using $$python ($$($$python --version))"; \
	test -x $(PY) || $$python -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(FAKE_DEVICES) $(PY) -m models.train --preset tiny --demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(TEST_DEVICES) $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "not slow" --durations=30 tests

test-slow: $(STAMP)
	$(TEST_DEVICES) $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m slow tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .cache/jax
