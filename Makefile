# RSNA Intracranial Hemorrhage Detection: from `kaggle competitions download` to `kaggle competitions submit`.
# `make help` lists the targets. Variables (the users' interface, see README):
#   DATA WORK MODEL MODELS FOLDS EPOCHS IMG_SIZE BATCH LIMIT DEVICE GPUS TUNE TRIALS STORAGE FILE MESSAGE IMAGE TOP LABEL

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
PYTHON ?= python3

DATA       ?= data/rsna
DEMO_DATA  ?= data/synthetic
WORK       ?=
WORKERS    ?= 2
PRESET     ?= demo
SEED       ?= 0
N          ?= 3000

# Options passed on only when set, so the Python defaults stay the single source of truth.
work_opt = $(if $(WORK),--work $(WORK))

.PHONY: help setup test test-all ci synthetic data prepare bench bench-metadata clean-work

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -m uv --version >/dev/null 2>&1; then $(PYTHON) -m pip install --quiet uv; fi
	@test -x $(PY) || $(PYTHON) -m uv venv --quiet --python $(PYTHON) $(VENV)
	$(PYTHON) -m uv pip install --quiet --python $(PY) -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create or update the virtual environment in .venv (quick when nothing changed)

test: $(STAMP) ## run the fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q

synthetic: $(STAMP) ## write the synthetic competition into DEMO_DATA (PRESET=demo|tiny, SEED=0)
	$(PY) -m competition.synthetic generate --out $(DEMO_DATA) --preset $(PRESET) --seed $(SEED) --workers $(WORKERS)

data: $(STAMP) ## kaggle competitions download + safe unzip into DATA (needs Kaggle credentials)
	$(PY) -m competition download --data $(DATA)

prepare: $(STAMP) ## metadata, labels and folds for DATA (then the image cache)
	$(PY) -m competition prepare --data $(DATA) $(work_opt) --workers $(WORKERS)

bench-metadata: $(STAMP) ## header-pass rate (headers/s per core) on up to N files of DATA
	$(PY) -m competition bench --data $(DATA) --n $(N) --workers $(WORKERS)

bench: bench-metadata ## every benchmark, one `name: value unit` line per figure

clean-work: ## delete the work folder of DATA (derived files only; DATA is never touched)
	rm -rf $(if $(WORK),$(WORK),work/$(notdir $(abspath $(DATA))))
