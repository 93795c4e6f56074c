# One command each for what people and CI run. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test chaos check lint protos protos-check bench bench-cluster clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: start a server on localhost:50051 with the example workers, print what they do, stop cleanly
run: $(STAMP)
	$(PY) -m tensorps.examples.demo $(ARGS)

## test: lint, type-check, verify generated code, then the test suite (TENSORPS_SLOW=1 adds slow profiles)
test: $(STAMP) check system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

## chaos: the chaos profile (README): TENSORPS_CHAOS_SECONDS (default 600), TENSORPS_CHAOS_SEED to replay
chaos: $(STAMP)
	TENSORPS_CHAOS=1 $(PY) -m pytest tests/test_chaos.py $(PYTEST_ARGS)

system-deps:
	scripts/system_deps.sh

check: $(STAMP) protos-check lint

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(VENV)/bin/mypy scripts/typecheck.sh

protos: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh

## protos-check: fail if the committed generated code differs from a fresh generation
protos-check: $(STAMP)
	PYTHON=$(PY) scripts/check_protos.sh

bench: $(STAMP) system-deps
	$(PY) -m bench $(ARGS)

bench-cluster: $(STAMP)
	$(PY) -m bench.clusterstep $(ARGS)
	$(PY) -m bench.clustersparse

clean:
	rm -rf $(VENV) build *.egg-info
