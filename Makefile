# kubetrain — `make run` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov (the manifest/Dockerfile scanner) lives in its own venv: its pins clash with kfp's.
SCAN_VENV ?= .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
# Vision (torchvision) lives in its own venv: the torchvision that imports beside a CPU torch here
# is 0.29.1, which needs torch 2.14.1 (a ~5.5 GB CUDA build locally); the core stays on torch 2.13.
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.installed
ARGS ?=

.PHONY: venv scan-venv venv-vision run run-vision run-detection test test-unit test-integration test-slow test-cluster test-vision lint compile docs bench clean images image-trainer kind-e2e

# (Re)create the virtual environment whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exactly: the range in pyproject.toml alone would pull a multi-GB CUDA 2.14.
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.*'
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,text,text-hf,tracking]'
	touch $(STAMP)

venv: $(STAMP)

$(SCAN_STAMP):
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet --disable-pip-version-check 'checkov==3.3.*'
	touch $(SCAN_STAMP)

scan-venv: $(SCAN_STAMP)

$(VISION_STAMP): pyproject.toml
	test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install --quiet --disable-pip-version-check 'torch==2.14.1' 'torchvision==0.29.1'
	$(VISION_PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,vision,timm]'
	touch $(VISION_STAMP)

venv-vision: $(VISION_STAMP)

## run: the whole pipeline on the bundled digits data (pass options with ARGS="--set train.epochs=5")
run: venv
	$(VENV)/bin/kubetrain run $(ARGS)

## run-vision: image classification end to end (Fashion-MNIST, recipes/vision.yaml) in the vision venv
run-vision: venv-vision
	$(VISION_VENV)/bin/kubetrain run --config vision $(ARGS)

## run-detection: object detection end to end (Fashion-MNIST scenes, pipeline/recipes/detection.yaml; docs/detection.md) in the vision venv
run-detection: venv-vision
	$(VISION_VENV)/bin/kubetrain run --config detection $(ARGS)

## test: lint, then the unit tier and the integration tier (not the slow suites)
test: lint test-unit test-integration

## test-cluster: the cluster path against a real kube-apiserver + etcd (../shared/k8s, etcd-server, kubectl, openssl; fails instead of skipping when CI is set)
test-cluster: venv
	$(PY) -m pytest -m cluster tests/cluster $(ARGS)

## test-vision: the tests marked vision, in the torchvision venv (the core venv skips those needing torchvision), slow ones included (PT2E int8 on ResNet-18 and MobileNetV3 compiles with inductor: minutes)
test-vision: venv-vision
	$(VISION_PY) -m pytest -m "vision" --durations=8 $(ARGS)

## test-unit: tests/unit only -- pure and fast, the tier to run all day (about 80 s on 2 cores, one pytest worker a core)
test-unit: venv scan-venv
	$(PY) -m pytest tests/unit -m "not integration and not e2e and not slow and not cluster" -n auto $(ARGS)

## test-integration: real processes together (kfp.local runs, torchrun, the CLI), not slow
test-integration: venv
	$(PY) -m pytest tests -m "integration and not e2e and not slow and not cluster" $(ARGS)

## test-slow: the suites marked slow (whole pipeline runs, containers; .ci/run's own step)
test-slow: venv
	$(PY) -m pytest -m "slow and not e2e and not cluster" $(ARGS)

# Only the folders that exist (benchmarks/ may not yet).
LINT_DIRS := $(wildcard src components pipelines tests benchmarks images examples)
## lint: ruff (lint and format) and the type checker (mypy over src/kubetrain, pyproject's [tool.mypy])
lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy


## docs: regenerate docs/configuration.md from the config models' descriptions (a unit test checks it is current)
docs: venv
	$(VENV)/bin/kubetrain config docs -o docs/configuration.md

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
bench: venv venv-vision
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(PY) benchmarks/train_bench.py $(ARGS)
	$(PY) benchmarks/search.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/text_train.py
	$(PY) benchmarks/decode_bench.py
	$(VISION_PY) benchmarks/vision_loader.py
	$(VISION_PY) benchmarks/vision_train.py
	$(VISION_PY) benchmarks/detection_loader.py
	$(VISION_PY) benchmarks/detection_train.py
	$(PY) benchmarks/preprocess_scaling.py --vision-python $(VISION_PY)
	$(PY) benchmarks/collect.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
