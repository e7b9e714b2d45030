# mmprecond developer entry points.  `make demo` and `make test` are all a new
# checkout needs: both create the virtual environment first (tools/install_env.sh;
# ~20 min the first time because mmcv compiles its C++ ops, seconds afterwards).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= $(or $(MMPRECOND_VENV),.venv)
VENV_PY := $(VENV)/bin/python
# The demo config reads data/synthetic_coco/ (configs/_base_/datasets).
DATA_DIR := data/synthetic_coco
DEMO_CONFIG ?= configs/demo/faster-rcnn_r18-tiny_fpn_adankfac_synthetic.py
DEMO_WORK_DIR ?= work_dirs/demo
PYTEST_ARGS ?=
# One intra-op thread per process unless set: on 2 cores, torch's default of
# two threads thrashes as soon as anything else runs (data workers, a second
# rank, another job).  Measured on the demo under load: 5-6 s/iter with 2
# threads, 0.52 s/iter with 1.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS
# With one thread per process the suite would leave the second core idle, so
# pytest-xdist runs TEST_WORKERS processes (one per core, at most 4, by
# default; 0 runs in-process).  --dist loadscope keeps each module (and each test class) on
# one worker, so module-scoped fixtures (a dist_train.sh run, a trained
# detector) are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)

.PHONY: help env data demo test test-fast test-zoo lint bench

help:
	@echo "make env        create/refresh $(VENV) (tools/install_env.sh)"
	@echo "make data       generate the synthetic COCO set in $(DATA_DIR)"
	@echo "make demo       train + evaluate the tiny Faster R-CNN demo, print its bbox AP"
	@echo "make test       the test suite, slow end-to-end tests included (one zoo"
	@echo "                config per model family x optimizer)"
	@echo "make test-fast  the tests not marked slow or zoo"
	@echo "make test-zoo   every zoo config (tests/test_configs) and the other zoo-marked tests"
	@echo "make lint       ruff"
	@echo "make bench      run every benchmarks/bench_*.py"

env:
	bash tools/install_env.sh

data: env
	$(VENV_PY) -m mmprecond.datasets.synthetic coco --out $(DATA_DIR)

demo: env data
	@mkdir -p $(DEMO_WORK_DIR)
	@start=$$(date +%s); \
	$(VENV_PY) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR) \
		2>&1 | tee $(DEMO_WORK_DIR)/demo.log; \
	echo "demo: $$(( $$(date +%s) - start )) s of training and evaluation"; \
	grep -E '^coco/bbox_mAP(_50)?: ' $(DEMO_WORK_DIR)/demo.log \
		| sed 's/^/demo: /' | grep . || { echo "demo: no bbox_mAP printed" >&2; exit 1; }

test: env
	$(VENV_PY) -m pytest -q -m "not zoo" $(XDIST) --durations=15 $(PYTEST_ARGS) tests

test-fast: env
	$(VENV_PY) -m pytest -q -m "not slow and not zoo" $(XDIST) --durations=10 $(PYTEST_ARGS) tests

test-zoo: env
	$(VENV_PY) -m pytest -q $(XDIST) --durations=10 $(PYTEST_ARGS) tests/test_configs
	$(VENV_PY) -m pytest -q $(XDIST) --durations=10 -m zoo $(PYTEST_ARGS) \
		tests --ignore=tests/test_configs

lint: env
	$(VENV_PY) -m ruff check .

bench: env data
	@shopt -s nullglob; files=(benchmarks/bench_*.py); \
	if (( $${#files[@]} == 0 )); then echo "no benchmarks/bench_*.py to run" >&2; exit 1; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(VENV_PY) "$$f"; done
