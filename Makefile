# `make train` and `make test` set themselves up: a .venv holding exactly requirements.lock.
# Every target runs from any folder (make -C <checkout> train): paths are rooted at the project.
# `make help` lists the targets: a `##` comment on a target's line is its entry.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
ARGS   ?=
LOGS   ?= logs
comma  := ,
space  := $(subst ,, )

.DEFAULT_GOAL := install
.PHONY: help install lock train sweep report release speedrun bench bench-demo demo test test-integration \
	test-browser test-slurm test-postgres test-all lint tensorboard mlflow clean

help: ## This list.
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  make %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# uv reads no pip configuration: where pip is pointed at local mirrors (pip.conf's extra-index-url
# and find-links), uv is handed them too and takes from PyPI only what they lack. Whatever the
# source, a file is installed only if its hash is the lock's.
PIP_MIRRORS = $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
PIP_WHEELS  = $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_SOURCES  = $(if $(PIP_MIRRORS)$(PIP_WHEELS),--index-strategy unsafe-first-match) \
	$(foreach url,$(PIP_MIRRORS),--extra-index-url $(url)) $(foreach dir,$(PIP_WHEELS),--find-links $(dir))
UV_LOCKED   = $(shell sed -n 's/^uv==\([^ ;]*\).*/\1/p' requirements.lock)

# uv, the version the lock holds, from PyPI (or the mirrors) into .venv.
$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_LOCKED)

# The lock, hash-checked, for this platform (it is universal: CUDA packages install on Linux
# only), then this project on top of it without its dependencies.
$(STAMP): requirements.lock pyproject.toml | $(UV)
	$(UV) pip sync --quiet --python $(PY) --require-hashes $(UV_SOURCES) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## .venv holding exactly the locked versions (uv: under a minute with a warm cache).

# Universal: one file for Linux, macOS and Windows, markers on what only some need (CUDA).
lock: | $(UV) ## Refresh requirements.lock from pyproject.toml (and constraints.txt), then install it.
	$(UV) pip compile pyproject.toml --universal --all-extras --group dev --python-version 3.11 \
		--constraints constraints.txt --generate-hashes --no-emit-package mnistlab --quiet -o requirements.lock
	$(MAKE) install

# Overrides go in ARGS: make train ARGS="trainer.max_epochs=3 seed=2"
train: install ## Train gap_cnn with the released recipe (experiment=robust), then test its best checkpoint.
	$(PY) train.py $(ARGS)

# About 30 min on 2 CPU cores; shorten with ARGS="trainer.max_epochs=2".
sweep: install ## A grid of dropout x LR: 6 full runs of the default recipe.
	$(PY) train.py -m model.dropout=0.05,0.1,0.15 optimizer.lr=0.01,0.025 $(ARGS)

report: install ## logs/report.{md,png}, logs/pareto.png from every run under logs/ (or LOGS=DIR), logs/debug/ left out.
	$(PY) -m mnistlab.report logs=$(LOGS) $(ARGS)

# make release RUNS=logs/multiruns/<date>_<time>_<pid>  (several folders: RUNS="a b", a sweep run in parts;
# ARGS="partial=true" for an incomplete sweep, ARGS="overwrite=true" to replace better weights)
release: install ## weights/<model>.{pt,onnx,json} from the median-validation seed of a complete seed sweep in RUNS.
	$(PY) -m mnistlab.release "runs=[$(subst $(space),$(comma),$(strip $(RUNS)))]" $(ARGS)

# Seed 0 first warms the compile caches.
speedrun: install ## The GPU speedrun over seeds 1-3; needs a GPU.
	$(PY) train.py -m experiment=speedrun seed=0,1,2,3 $(ARGS)

# A few minutes; ARGS="compile=true" adds torch.compile.
bench: install ## Per-epoch cost of our training path against a bare PyTorch loop.
	$(PY) -m mnistlab.bench $(ARGS)

# ARGS="port=8080" for another port.
demo: install ## The page to draw a digit on, with the released weights: http://127.0.0.1:7860
	$(PY) demo.py $(ARGS)

bench-demo: install ## Latency of the demo page over HTTP: median of 20 calls from another process (~1 min).
	$(PY) -m mnistlab.demo_bench $(ARGS)

# Offline apart from one MNIST fetch into data/ on first use.
test: install ## The fast test suite: everything that runs inside the pytest process.
	$(PY) -m pytest -m "not slow and not browser and not slurm and not integration and not postgres" -q

test-integration: install ## Tests whose point is a separate process: scripts, sweeps, servers, workers, fetches.
	$(PY) -m pytest -m "integration and not slow and not browser and not slurm and not postgres" -q

# Debian's chromium package, installed when missing (Playwright's own download needs the network).
test-browser: install ## The demo page driven in a real headless Chromium.
	command -v chromium >/dev/null || scripts/install-chromium.sh
	$(PY) -m pytest -m browser -q

# scripts/slurm-local.sh installs SLURM from Debian when missing, starts it, and stops it after the tests.
test-slurm: install ## Sweeps and a shared Optuna study on a real one-node SLURM cluster.
	scripts/slurm-local.sh up
	SLURM_CONF=$${SLURM_LOCAL_DIR:-/tmp/mnistlab-slurm}/slurm.conf $(PY) -m pytest -m slurm -q; \
		status=$$?; scripts/slurm-local.sh down; exit $$status

# scripts/postgres-local.sh installs Debian's postgresql when missing, starts a throwaway server on
# 127.0.0.1, and stops it after the tests.
test-postgres: install ## An Optuna study shared by workers through a real PostgreSQL, one worker killed.
	MNISTLAB_POSTGRES_URL=$$(scripts/postgres-local.sh up) $(PY) -m pytest -m postgres -q; \
		status=$$?; scripts/postgres-local.sh down; exit $$status

test-all: install ## Every test: the slow ones, the integration tier, the browser and SLURM tests.
	$(PY) -m pytest -q -m "not browser and not slurm and not postgres"
	$(MAKE) test-browser test-slurm test-postgres

lint: install ## ruff check and ruff format --check over the whole tree.
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

tensorboard: install ## TensorBoard over logs/ at http://127.0.0.1:6006
	$(VENV)/bin/tensorboard --logdir logs --host 127.0.0.1 --port 6006

mlflow: install ## The MLflow UI over the runs of logger=mlflow (logs/mlflow.db) at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/logs/mlflow.db --host 127.0.0.1 --port 5000

clean: ## Remove the environment and caches; data/, logs/ and weights/ are kept.
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
