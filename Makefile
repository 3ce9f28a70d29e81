# The two quickstart commands. Both first install what is missing (once): Debian's Fashion-MNIST files and
# the Python packages. Without PYTHON they use the project's own virtual environment, .venv, made from
# BASE_PYTHON (a distribution's Python refuses pip installs outside one, PEP 668); PYTHON=... uses that
# interpreter as it is.
BASE_PYTHON ?= python3
VENV := .venv
ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
# The marker lives in the environment it describes.
MARKER := $(VENV)/.deps-installed
NEW_VENV := $(VENV)/bin/python
else
# The install marker names the interpreter, so another PYTHON installs again.
MARKER := .deps-installed-$(shell $(PYTHON) -c 'import sys, zlib; print(zlib.crc32(sys.executable.encode()))' 2>/dev/null)
NEW_VENV :=
endif
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: run test test-fast install python-version study tuned-study longtail-study

run: install
	$(PYTHON) -m oat_jax.main --config configs/default.py --workdir runs/default

test: install
	$(PYTHON) -m pytest -q -n 2

# The fast tier: everything but the tests marked slow (tests/conftest.py), for the edit-test loop.
test-fast: install
	$(PYTHON) -m pytest -q -n 2 -m "not slow"

install: python-version $(MARKER)

# Debian ships venv's pip bootstrap separately (python3-venv); it is installed when missing.
$(VENV)/bin/python:
	@$(BASE_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: oat_jax needs Python 3.11 or newer; $(BASE_PYTHON) is $$($(BASE_PYTHON) --version 2>/dev/null || echo "not found")." \
	       "Pick another with BASE_PYTHON=..., e.g. make run BASE_PYTHON=python3.11"; exit 2; }
	@$(BASE_PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(BASE_PYTHON) -m venv $(VENV)

python-version: $(NEW_VENV)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: oat_jax needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo "not found")." \
	       "Pick another with PYTHON=..., e.g. make run PYTHON=python3.11"; exit 2; }

$(MARKER): requirements.txt setup.cfg
	@[ -f $(FASHION_MNIST) ] || [ -n "$$OAT_DATA_DIR" ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	$(PYTHON) -m pip install -q -r requirements.txt -e '.[dev]'
	@touch $@

# The anchor study (results/fashion_mnist_study/README.md): one run per seed, its workdir under results/ so that a
# sitting's progress is committed and the next resumes it; a finished seed keeps no checkpoints and is skipped.
# The label-smoothing control came later: a run of its own per seed, pooled with the others by the report.
STUDY_SEEDS ?= 0 1 2 3 4
STUDY := results/fashion_mnist_study

study: install
	@for seed in $(STUDY_SEEDS); do \
	  for run in "seed_$$seed" "seed_$${seed}_ce_smooth --config.arms=ce_smooth"; do \
	    set -- $$run; workdir=$(STUDY)/$$1; shift; \
	    if [ -f $$workdir/summary.json ]; then echo "$$workdir: finished"; continue; fi; \
	    $(PYTHON) -m oat_jax.main --config configs/fashion_mnist_study.py --workdir $$workdir \
	      --config.seed=$$seed --config.progress=false "$$@" || exit $$?; \
	    rm -rf $$workdir/checkpoints $$workdir/tensorboard $$workdir/.lock; \
	  done; \
	done
	$(PYTHON) -m oat_jax.report $(STUDY)/seed_* --out $(STUDY)/report.md --figure $(STUDY)/comparisons.png \
	  --by-epoch 40,60,80,100

# The tuned study (results/fashion_mnist_tuned/README.md): stage 1 tunes each arm's learning rate on validation
# (seed 100), stage 2 trains each arm at its choice on ten fresh seeds, then the report (report.md and figures).
# Each run is a workdir under results/ (committed as it finishes, its checkpoints pruned); a rerun resumes where
# the last one stopped.
TUNED := results/fashion_mnist_tuned
TUNED_GRID ?= learning_rate=0.0003,0.001,0.003,0.01,0.03
# The primary contrasts, fixed before stage 2.
TUNED_CONTRASTS := oat-ce,oat-ce_smooth,oat-oat_uniform,oat-square

tuned-study: install
	$(PYTHON) -m oat_jax.sweep --config configs/fashion_mnist_tuned.py --grid $(TUNED_GRID) --seeds 100 \
	  --out $(TUNED)/stage1 --parallel 1 --prune --extend-edges
	$(PYTHON) -m oat_jax.sweep confirm $(TUNED)/stage1 --seeds 200-209 --parallel 1 --prune
	$(PYTHON) -m oat_jax.report $(TUNED)/stage1/confirm/*/seed_* --sweep $(TUNED)/stage1 \
	  --sweep-figure $(TUNED)/sweep.png --contrasts $(TUNED_CONTRASTS) \
	  --by-epoch 20,40,60,80,100 --curves $(TUNED)/curves.png --out $(TUNED)/report.md \
	  --figure $(TUNED)/comparisons.png
	@# The same contrasts at epoch 100, the protocol's last epoch: the score shown beside the primary one.
	$(PYTHON) -m oat_jax.report $(TUNED)/stage1/confirm/*/seed_* --select final --sweep $(TUNED)/stage1 \
	  --contrasts $(TUNED_CONTRASTS) --out $(TUNED)/report_final.md

# The long-tailed study (results/fashion_mnist_longtail/README.md): learning rates tuned on balanced validation accuracy (seed
# 100), then each arm at its choice on ten fresh seeds, then the report; resumable like the tuned study.
LONGTAIL := results/fashion_mnist_longtail
LONGTAIL_GRID ?= learning_rate=0.001,0.003,0.01
LONGTAIL_CONTRASTS := oat-ce,oat-oat_uniform,oat-ce_logit_adjusted

longtail-study: install
	$(PYTHON) -m oat_jax.sweep --config configs/fashion_mnist_longtail.py --grid $(LONGTAIL_GRID) --seeds 100 \
	  --out $(LONGTAIL)/stage1 --parallel 1 --prune --extend-edges
	$(PYTHON) -m oat_jax.sweep confirm $(LONGTAIL)/stage1 --seeds 200-209 --parallel 1 --prune
	$(PYTHON) -m oat_jax.report $(LONGTAIL)/stage1/confirm/*/seed_* --metric balanced --sweep $(LONGTAIL)/stage1 \
	  --sweep-figure $(LONGTAIL)/sweep.png --contrasts $(LONGTAIL_CONTRASTS) \
	  --out $(LONGTAIL)/report.md --figure $(LONGTAIL)/comparisons.png
	@# The same contrasts on the least frequent third's test accuracy, the score beside the primary one.
	$(PYTHON) -m oat_jax.report $(LONGTAIL)/stage1/confirm/*/seed_* --metric few --sweep $(LONGTAIL)/stage1 \
	  --contrasts $(LONGTAIL_CONTRASTS) --out $(LONGTAIL)/report_few.md
	@# One seed's figures, the anchor against the prior among them, from the run that holds OAT.
	@for run in $(LONGTAIL)/stage1/confirm/*/seed_200; do \
	  if $(PYTHON) -c 'import json, sys; sys.exit("oat" not in json.load(open(sys.argv[1]))["arms"])' \
	      $$run/summary.json; then \
	    $(PYTHON) -m oat_jax.report plots $$run --no-eval --out-dir $(LONGTAIL)/plots || exit $$?; \
	  fi; \
	done
