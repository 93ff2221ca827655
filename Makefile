# headclass: `make demo` runs the main job, `make test` runs the tests. Each builds its venv once.
PYTHON ?= python3
VENV := .venv
LEGACY := .venv-tl3
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test test-legacy lint bench clean

# torch==2.13.0 first: that spelling takes the CPU wheel; a plain `torch` would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) torch==2.13.0
	$(VENV)/bin/pip install $(PIP_QUIET) -e ".[dev]"
	touch $@

# The previous TransformerLens generation (HookedTransformer), for the loader contract tests.
$(LEGACY)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install $(PIP_QUIET) torch==2.13.0
	$(LEGACY)/bin/pip install $(PIP_QUIET) transformer-lens==3.9.0
	$(LEGACY)/bin/pip install $(PIP_QUIET) -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/headclass demo --out headclass-report

test: $(VENV)/.installed $(LEGACY)/.installed
	HEADCLASS_PEER_PYTHON=$(abspath $(LEGACY))/bin/python $(VENV)/bin/python -m pytest -q
	$(MAKE) --no-print-directory test-legacy

test-legacy: $(LEGACY)/.installed
	$(LEGACY)/bin/python -m pytest -q tests/loading

# ruff (lint + format check) and mypy, configured in pyproject.toml; .pre-commit-config.yaml runs the same.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check headclass tests benchmarks
	$(VENV)/bin/ruff format --check headclass tests benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	for script in benchmarks/bench_*.py; do $(VENV)/bin/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(LEGACY) headclass-report .pytest_cache
