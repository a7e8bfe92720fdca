# kubetrain — `make run` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv run test test-fast test-slow lint compile bench clean

# (Re)create the virtual environment whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## run: the whole pipeline on the bundled digits data (pass options with ARGS="--set train.epochs=5")
run: venv
	$(VENV)/bin/kubetrain run $(ARGS)

## test: lint, then unit and local integration tests (everything that needs no cluster)
test: venv lint
	$(PY) -m pytest -m "not e2e and not slow" $(ARGS)

## test-slow: the suites marked slow (run by .ci/run in their own step)
test-slow: venv
	$(PY) -m pytest -m slow $(ARGS)

lint: venv
	$(VENV)/bin/ruff check src components pipelines tests benchmarks
	$(VENV)/bin/ruff format --check src components pipelines tests benchmarks

## bench: search (samplers, early stopping) and quantization benchmarks -> benchmarks/results/
bench: venv
	$(PY) benchmarks/search.py
	$(PY) benchmarks/quantize.py

## compile: the KFP IR YAML of the default pipeline
compile: venv
	$(VENV)/bin/kubetrain compile -o pipelines/kubetrain_pipeline.yaml

clean:
	rm -rf runs .pytest_cache .ruff_cache
