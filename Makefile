# RSNA Intracranial Hemorrhage Detection: from `kaggle competitions download` to `kaggle competitions submit`.
# `make help` lists the targets. Variables (the users' interface, see README):
#   DATA WORK N_FOLDS MODEL MODELS FOLDS EPOCHS IMG_SIZE BATCH LIMIT DEVICE GPUS SPREAD WORKERS TUNE TRIALS STORAGE THREADS STACKER ROWS FILE MESSAGE IMAGE TOP LABEL
#   STUDY OUT BUNDLE STACK_OPTS NNODES NODE_RANK RDZV_ENDPOINT RDZV_ID TRACKER FORCE WAIT POLL LOG
#   DICOM_OUT AE_TITLE PORT LISTEN_HOST ALLOW SETTLE DEST QUEUE (DICOM results and the DICOM node)
#   MUTATE_MODULES MUTATE_BUDGET MUTATE_JOBS (make mutate) SCALE REHEARSAL_DIR (make rehearsal)

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
WORKERS    ?=
PRESET     ?= demo
PATIENTS   ?=
SUBMISSIONS ?= submissions
LOG ?= $(SUBMISSIONS)/log.csv# the submissions log `make submit` appends to (beside the submitted files)
WAIT ?= 300# seconds `make submit` waits for the score (0: do not wait)
POLL ?= 30# seconds between two looks at the score
FORCE ?=# 1: submit a file even if the log shows it was submitted before
SEED       ?= 0
N          ?= 3000
N_FOLDS    ?=
SCALE      ?= 1.0
REHEARSAL_DIR ?=

# Level 1, level 2, submission and explanation options: empty means "the Python default".
MODEL    ?=
MODELS   ?=
FOLDS    ?=
EPOCHS   ?=
IMG_SIZE ?=
BATCH    ?=
LIMIT    ?=
DEVICE   ?=
GPUS     ?=
SPREAD   ?=
TUNE     ?=
TRIALS   ?=
STORAGE  ?=
THREADS  ?=
STACKER  ?=
ROWS     ?=
FILE     ?=
MESSAGE  ?=
IMAGE    ?=
TOP      ?=
LABEL    ?=
STUDY    ?=
OUT      ?=
BUNDLE   ?=
SET      ?=
TRACKER  ?=
STACK_OPTS ?=
NNODES   ?=
NODE_RANK ?=
RDZV_ENDPOINT ?=
RDZV_ID  ?=
# 512 serves every spec of the zoo (none reads more; MODELS= builds just what those read, see
# level1_models/caches.py); the demo's tiny models need no more than 256.
CACHE_SIZE ?= 512
DEMO_CACHE_SIZE ?= 256

# make prepare / cache MODELS="a b c" (or a,b,c): the cache sizes those specs read (an unknown name
# stops before any work), each one resumable pass; without MODELS, CACHE_SIZE.
comma := ,
cache_sizes = $(if $(strip $(MODELS)),$$($(PY) -m level1_models cache-sizes $(subst $(comma), ,$(MODELS))),$(CACHE_SIZE))
cache_pass = for size in $$sizes; do $(PY) -m features cache --data $(DATA) $(work_opt) --size $$size $(call opt,--workers,$(WORKERS)); done

# Options passed on only when set, so the Python defaults stay the single source of truth.
work_opt = $(if $(WORK),--work $(WORK))
opt = $(if $(2),$(1) $(2))
yes = $(filter 1 yes true,$(1))
sets = $(foreach s,$(SET),--set $(s))
# GPUS=N trains one fold across N GPUs with DDP (torchrun); otherwise one process. NNODES=M with
# RDZV_ENDPOINT=host:port (the same on every machine; run the same command on each) spreads it over
# M machines through torchrun's c10d rendezvous; NODE_RANK fixes a machine's rank (optional).
# GPUS=N SPREAD=folds: one process that starts one single-GPU job per fold, N at a time
# (level1_models/spread.py).
rdzv = --nnodes=$(NNODES) --rdzv_backend=c10d --rdzv_endpoint=$(RDZV_ENDPOINT) --rdzv_id=$(if $(RDZV_ID),$(RDZV_ID),rsna-$(MODEL)) $(call opt,--node_rank,$(NODE_RANK))
launch = $(if $(and $(GPUS),$(if $(SPREAD),,ddp)),$(VENV)/bin/torchrun $(if $(NNODES),$(rdzv),--standalone) --nproc_per_node=$(GPUS),$(PY))
need = @test -n "$($(1))" || { echo "make $@: set $(1)=<$(2)>"; exit 2; }

.PHONY: help setup demo test test-all test-orthanc synthetic data prepare cache oof tensorboard list-models plan stack submission submit leaderboard \
        explain report predict listen export mutate bench bench-checks bench-metadata bench-features bench-train gpu-check clean-work rehearsal

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -m uv --version >/dev/null 2>&1; then $(PYTHON) -m pip install --quiet uv; fi
	@test -x $(PY) || $(PYTHON) -m uv venv --quiet --python $(PYTHON) $(VENV)
	@# --compile-bytecode: where .pyc files cannot be written at import (PYTHONDONTWRITEBYTECODE), every process would
	@# compile torch again (measured: 25 of the 44 s of a finished model's make oof on the 2-core machine).
	$(PYTHON) -m uv pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create or update the virtual environment in .venv (quick when nothing changed)

test: $(STAMP) ## run the fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q

test-orthanc: $(STAMP) ## the DICOM node against a real Orthanc on 127.0.0.1 (apt-get install orthanc; skips without it)
	$(PY) -m pytest -q -m slow tests/test_orthanc.py

# make mutate: mutmut on the core modules, each against its own fast tests (tests/mutate.py), in a scratch
# copy per module. MUTATE_MODULES picks some (metric dicom folds tabular bundle fold_split blend);
# MUTATE_BUDGET is each module's wall-clock seconds (mutants not reached are reported as not run);
# MUTATE_JOBS mutants at once (default: every core).
MUTATE_MODULES ?=
MUTATE_BUDGET  ?= 600
MUTATE_JOBS    ?=
mutate: $(STAMP) ## mutation score per core module: `mutate <module>: killed/total (score %)` + survivors (MUTATE_MODULES MUTATE_BUDGET MUTATE_JOBS)
	$(PY) tests/mutate.py --budget $(MUTATE_BUDGET) $(if $(strip $(MUTATE_MODULES)),--modules "$(MUTATE_MODULES)") $(call opt,--jobs,$(MUTATE_JOBS))

# The demo: three small CNNs that differ in architecture and window combination, a short Optuna study.
DEMO_MODELS ?= tiny_resnet tiny_byobnet tiny_efficientnet
DEMO_EPOCHS ?=# empty: each spec's own epochs (tiny_resnet 3, tiny_byobnet 3, tiny_efficientnet 6)
DEMO_TRIALS ?= 4
# 4 embedding dims per model for the sequence model: on the demo's 78 train patients it overfits wider ones
# (sequence model alone, OOF weighted log loss, 2026-11-25: 256 dims 0.2146, 16 dims 0.1910, 4 dims 0.1564,
# none 0.1674). The product default (256) is for the real data's 750k slices.
DEMO_STACK  ?= --rounds 400 --neighbours 3 --early-stopping 40 --embedding-dim 4
# Run a stage; on failure name it and the way back in (every stage keeps and reuses finished work).
stage = echo ">>> demo: $(1)" && { $(2); } || { echo "make demo: stage '$(1)' failed (see above); fix that and run make demo again: finished stages are kept" >&2; exit 1; }
demo_vars = DATA=$(DEMO_DATA) $(if $(WORK),WORK=$(WORK)) SUBMISSIONS=$(SUBMISSIONS) CACHE_SIZE=$(DEMO_CACHE_SIZE)

demo: $(STAMP) ## the whole competition on the synthetic data: generate, prepare, 3 CNNs, stack + Optuna, submission, score, report
	@$(call stage,synthetic competition,$(PY) -m competition.synthetic generate --out $(DEMO_DATA) --preset $(PRESET) --seed $(SEED) $(call opt,--workers,$(WORKERS)) $(call opt,--patients,$(PATIENTS)))
	@$(call stage,prepare,$(MAKE) --no-print-directory prepare $(demo_vars))
	@$(foreach m,$(DEMO_MODELS),$(call stage,level 1 $(m),$(MAKE) --no-print-directory oof $(demo_vars) MODEL=$(m) EPOCHS=$(DEMO_EPOCHS)) &&) true
	@$(call stage,stack,$(MAKE) --no-print-directory stack $(demo_vars) TUNE=1 TRIALS=$(DEMO_TRIALS) STACK_OPTS="$(DEMO_STACK)")
	@$(call stage,report,$(MAKE) --no-print-directory report $(demo_vars))
	@$(call stage,summary,$(PY) -m reports.summary --data $(DEMO_DATA) $(work_opt) --submission $(SUBMISSIONS)/$(notdir $(abspath $(DEMO_DATA)))-stack.csv.gz)

# `make synthetic DATA=x` writes x; without DATA on the command line (or in the environment) DEMO_DATA.
synthetic_out = $(if $(filter command line environment,$(origin DATA)),$(DATA),$(DEMO_DATA))

synthetic: $(STAMP) ## write the synthetic competition into DATA if given, else DEMO_DATA (PRESET=demo|tiny, SEED=0)
	$(PY) -m competition.synthetic generate --out $(synthetic_out) --preset $(PRESET) --seed $(SEED) $(call opt,--workers,$(WORKERS)) $(call opt,--patients,$(PATIENTS))

data: $(STAMP) ## kaggle competitions download + safe unzip into DATA (needs Kaggle credentials)
	$(PY) -m competition download --data $(DATA)

prepare: $(STAMP) ## metadata, labels, folds (N_FOLDS, default 5) and the image cache for DATA (the sizes MODELS="a b" read, else CACHE_SIZE)
	sizes="$(cache_sizes)"; \
	$(PY) -m competition prepare --data $(DATA) $(work_opt) $(call opt,--workers,$(WORKERS)) $(call opt,--n-folds,$(N_FOLDS)); \
	$(cache_pass)

cache: $(STAMP) ## only the image cache (int16 HU) for DATA: the sizes MODELS="a b" read (python -m level1_models cache-sizes), else CACHE_SIZE px
	sizes="$(cache_sizes)"; $(cache_pass)

list-models: $(STAMP) ## the model zoo (names for MODEL=)
	$(PY) -m level1_models list

# The real competition's counts, or those of DATA's work folder when DATA is given on the command line.
plan: $(STAMP) ## before a GPU run: caches, FLOPs/image, GPU-hours per fold and in all, embeddings, wall time on GPUS (MODELS N_FOLDS EPOCHS IMG_SIZE BATCH LIMIT SET)
	$(PY) -m level1_models plan $(if $(MODELS),--models "$(MODELS)") $(call opt,--gpus,$(GPUS)) $(call opt,--n-folds,$(N_FOLDS)) \
	  $(if $(filter command line environment,$(origin DATA)),--data $(DATA) $(work_opt)) \
	  $(call opt,--epochs,$(EPOCHS)) $(call opt,--img-size,$(IMG_SIZE)) $(call opt,--batch,$(BATCH)) \
	  $(call opt,--limit,$(LIMIT)) $(sets)

oof: $(STAMP) ## K-fold level-1 training of MODEL -> OOF + test predictions (FOLDS EPOCHS IMG_SIZE BATCH LIMIT DEVICE GPUS SPREAD=folds NNODES WORKERS TRACKER)
	$(call need,MODEL,zoo name; make list-models)
	$(launch) -m level1_models oof --model $(MODEL) --data $(DATA) $(work_opt) $(call opt,--folds,$(FOLDS)) \
	  $(call opt,--epochs,$(EPOCHS)) $(call opt,--img-size,$(IMG_SIZE)) $(call opt,--batch,$(BATCH)) \
	  $(call opt,--limit,$(LIMIT)) $(call opt,--device,$(DEVICE)) $(call opt,--workers,$(WORKERS)) \
	  $(if $(SPREAD),--spread $(SPREAD) $(call opt,--gpus,$(GPUS))) $(sets) \
	  $(call opt,--set,$(if $(TRACKER),tracker=$(TRACKER)))
	$(PY) -m reports.plots --data $(DATA) $(work_opt) --model $(MODEL) --skip-missing

tensorboard: $(STAMP) ## TensorBoard over every level-1 model of DATA (train loss, lr, validation loss, images/s per fold)
	$(PY) -m tensorboard.main --logdir "$$($(PY) -c 'import sys; from competition.paths import WorkPaths; \
	  print(WorkPaths.for_data(sys.argv[1], sys.argv[2] or None).models)' '$(DATA)' '$(WORK)')"

stack: $(STAMP) ## level 2 over every level-1 folder (or MODELS=a,b): LightGBM + sequence model, blended (STACKER THREADS DEVICE TUNE=1 TRIALS STORAGE STACK_OPTS); reused when nothing changed -> submission
	$(PY) -m level2_stacking --data $(DATA) $(work_opt) $(call opt,--models,$(MODELS)) $(if $(call yes,$(TUNE)),--tune) \
	  $(call opt,--trials,$(TRIALS)) $(call opt,--storage,$(STORAGE)) $(call opt,--threads,$(THREADS)) \
	  $(call opt,--stacker,$(STACKER)) $(call opt,--seq-device,$(DEVICE)) $(STACK_OPTS)
	$(PY) -m reports.plots --data $(DATA) $(work_opt) --stack
	$(PY) -m submissions write --data $(DATA) $(work_opt) --stack --out-dir $(SUBMISSIONS)

submission: $(STAMP) ## a submission straight from one level-1 model (MODEL=name)
	$(call need,MODEL,zoo name of a trained model)
	$(PY) -m submissions write --data $(DATA) $(work_opt) --model $(MODEL) --out-dir $(SUBMISSIONS)

submit: $(STAMP) ## kaggle competitions submit FILE with MESSAGE: validated, refused if already submitted (FORCE=1), logged beside FILE, scores waited for (WAIT POLL)
	$(call need,FILE,path of a submission file)
	$(PY) -m submissions submit --file $(FILE) --message "$(if $(MESSAGE),$(MESSAGE),$(notdir $(FILE)))" --data $(DATA) $(work_opt) \
	  $(if $(call yes,$(FORCE)),--force) --wait $(WAIT) --poll $(POLL)

leaderboard: $(STAMP) ## refresh pending scores in the submissions log (LOG), print it, draw CV against public/private LB (cv_vs_lb.png, in make report)
	$(PY) -m submissions leaderboard --log $(LOG)
	$(PY) -m reports.leaderboard --log $(LOG)

explain: $(STAMP) ## Grad-CAM, Guided Backprop, DeconvNet, Guided Grad-CAM panels: MODEL and IMAGE=id[,id] or TOP=n (LABEL, DEVICE)
	$(call need,MODEL,zoo name of a trained model)
	@test -n "$(IMAGE)$(TOP)" || { echo "make explain: set IMAGE=<image_id> or TOP=<n>"; exit 2; }
	$(PY) -m level1_models.explain_cli --model $(MODEL) --data $(DATA) $(work_opt) $(call opt,--image,$(IMAGE)) \
	  $(call opt,--top,$(TOP)) $(call opt,--label,$(LABEL)) $(call opt,--device,$(DEVICE))

report: $(STAMP) ## one self-contained HTML page: every model's scores side by side, ROC/PR/threshold plots, curves, explanations
	$(PY) -m reports.html_report --data $(DATA) $(work_opt) --submissions-log $(LOG)

predict: $(STAMP) ## per-slice and per-study calls for the DICOM series under STUDY (a folder, or dicomweb[s]://HOST:PORT/PATH/studies/UID: WADO-RS into OUT/source; credentials in DICOMWEB_TOKEN or DICOMWEB_USER/DICOMWEB_PASSWORD), with report.html (BUNDLE= or DATA/WORK; MODELS OUT DEVICE TOP; DICOM_OUT=1: SR + Grad-CAM images in OUT/dicom)
	$(call need,STUDY,folder of DICOM files or dicomweb://HOST:PORT/PATH/studies/UID)
	$(PY) -m prediction predict --study $(STUDY) $(if $(BUNDLE),--bundle $(BUNDLE),--data $(DATA) $(work_opt)) \
	  $(call opt,--models,$(MODELS)) $(call opt,--out,$(OUT)) $(call opt,--device,$(DEVICE)) $(call opt,--top,$(TOP)) \
	  $(if $(call yes,$(DICOM_OUT)),--dicom)

listen: $(STAMP) ## DICOM node: C-STORE receiver (AE_TITLE PORT LISTEN_HOST; ALLOW= calling AEs), predicts each study SETTLE s after its last instance, sends the SR and Grad-CAM images to DEST=host:port:AE (C-STORE) or DEST=dicomweb[s]://HOST:PORT/PATH (STOW-RS) (BUNDLE= or DATA/WORK; QUEUE MODELS DEVICE TOP)
	$(call need,ALLOW,comma list of calling AE titles allowed to send)
	$(PY) -m prediction.listener $(if $(BUNDLE),--bundle $(BUNDLE),--data $(DATA) $(work_opt)) --allow $(ALLOW) \
	  $(call opt,--ae-title,$(AE_TITLE)) $(call opt,--port,$(PORT)) $(call opt,--host,$(LISTEN_HOST)) \
	  $(call opt,--settle,$(SETTLE)) $(call opt,--dest,$(DEST)) $(call opt,--queue,$(QUEUE)) \
	  $(call opt,--models,$(MODELS)) $(call opt,--device,$(DEVICE)) $(call opt,--top,$(TOP))

export: $(STAMP) ## one archive of the trained ensemble of DATA (MODELS; OUT=file): checkpoints, configs, fitted level 2, threshold, hashes
	$(PY) -m prediction export --data $(DATA) $(work_opt) $(call opt,--models,$(MODELS)) $(call opt,--out,$(OUT))

bench-metadata: $(STAMP) ## header-pass rate (headers/s per core) on up to N files of DATA
	$(PY) -m competition bench --data $(DATA) --n $(N) $(call opt,--workers,$(WORKERS))

bench-features: $(STAMP) ## cache build and loader rates against the naive pydicom/float64 baseline
	$(PY) -m features.bench --data $(DATA) $(work_opt)

bench-train: $(STAMP) ## training and inference images/s of MODEL, and the share of time spent waiting for data
	$(call need,MODEL,zoo name; make list-models)
	$(PY) -m level1_models bench --model $(MODEL) --data $(DATA) $(work_opt) $(call opt,--img-size,$(IMG_SIZE)) \
	  $(call opt,--batch,$(BATCH)) $(call opt,--device,$(DEVICE)) $(sets)

gpu-check: $(STAMP) ## on a CUDA machine: resnet50 + efficientnet_b0 at 256 px from the real loader vs random tensors (MODELS="a b": those specs at their own size and batch, with peak memory), DDP with 2+ GPUs
	$(PY) -m level1_models.gpu_check $(call opt,--batch,$(BATCH)) $(call opt,--workers,$(WORKERS)) $(if $(strip $(MODELS)),--models "$(MODELS)")

bench-stack: $(STAMP) ## level 2 at the real size (752k rows, 5 models, 256-dim embeddings; ROWS=n smaller): features, memory, LightGBM per thread count, sequence epoch, blend
	$(PY) -m level2_stacking.bench $(call opt,--rows,$(ROWS)) $(call opt,--threads,$(THREADS))

bench-checks: $(STAMP) ## speeds the tests no longer assert: a rerun of a finished synthetic generation, an offline missing-weights refusal
	$(PY) tests/bench_checks.py

bench: bench-metadata bench-features bench-stack ## every data benchmark, one `name: value unit` line per figure

# The rehearsal: every stage at SCALE x the real counts (752,803 + 121,232 images) with the real code.
rehearsal: $(STAMP) ## every stage at SCALE x the real 874k images (64 px; level 1 fabricated for the 5 recommended models + a real tiny CNN on LIMIT images): one line per stage (time, peak memory, rows, disk) and REHEARSAL_DIR/rehearsal.json (default work/rehearsal-SCALE; WORKERS LIMIT STACK_OPTS)
	$(PY) -m rehearsal run --scale $(SCALE) $(call opt,--dir,$(REHEARSAL_DIR)) $(call opt,--workers,$(WORKERS)) \
	  $(call opt,--limit,$(LIMIT)) $(if $(STACK_OPTS),--stack-opts "$(STACK_OPTS)")

clean-work: ## delete the work folder of DATA (derived files only; DATA is never touched)
	rm -rf $(if $(WORK),$(WORK),work/$(notdir $(abspath $(DATA))))
