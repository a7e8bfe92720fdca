# kubetrain — `make run` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov (the manifest/Dockerfile scanner) lives in its own venv: its pins clash with kfp's.
SCAN_VENV ?= .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
ARGS ?=

.PHONY: venv scan-venv run test test-fast test-slow test-cluster lint compile bench clean images image-trainer kind-e2e

# (Re)create the virtual environment whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(SCAN_STAMP):
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet --disable-pip-version-check 'checkov==3.3.*'
	touch $(SCAN_STAMP)

scan-venv: $(SCAN_STAMP)

## run: the whole pipeline on the bundled digits data (pass options with ARGS="--set train.epochs=5")
run: venv
	$(VENV)/bin/kubetrain run $(ARGS)

## test: lint, then unit and local integration tests (everything that needs no cluster)
test: venv scan-venv lint
	$(PY) -m pytest -m "not e2e and not slow and not cluster" $(ARGS)

## test-cluster: the cluster path against a real kube-apiserver + etcd (../shared/k8s, Debian's etcd-server)
test-cluster: venv
	$(PY) -m pytest -m cluster tests/cluster $(ARGS)

## test-slow: the suites marked slow (run by .ci/run in their own step)
test-slow: venv
	$(PY) -m pytest -m slow $(ARGS)

# Only the folders that exist (benchmarks/ may not yet).
LINT_DIRS := $(wildcard src components pipelines tests benchmarks images)
lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)


## compile: the KFP IR YAML of the default pipeline
compile: venv
	$(VENV)/bin/kubetrain compile -o pipelines/kubetrain_pipeline.yaml

## images: the runtime image (and the trainer image where its CUDA base can be pulled); see README
images:
	images/build.sh runtime trainer

## image-trainer: the CUDA trainer image only (IMAGE_BASE=local: debootstrap base + PyPI CUDA torch, ~6 GB; or a base of your own)
image-trainer:
	images/build.sh trainer

## kind-e2e: kind cluster + platform + images, pipeline submitted with the kfp CLI, then torn down
kind-e2e: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" scripts/kind-e2e.sh

## bench: every benchmark, side by side and repeated -> benchmarks/results/, benchmarks/RESULTS.md
bench: venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(PY) benchmarks/train_bench.py $(ARGS)
	$(PY) benchmarks/search.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/collect.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
