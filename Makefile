# `make train` and `make test` set themselves up: a .venv holding exactly requirements.lock.
# Every target runs from any folder (make -C <checkout> train): paths are rooted at the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip --disable-pip-version-check
ARGS   ?=
LOGS   ?= logs
comma  := ,
space  := $(subst ,, )

.PHONY: install lock train sweep report release speedrun bench bench-demo demo test test-browser test-slurm test-postgres test-all lint tensorboard clean

## The locked versions (hash-checked), then this project on top of them without its dependencies.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## Refresh requirements.lock from pyproject.toml (and constraints.txt), then install it.
lock:
	test -x $(VENV)/bin/uv || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PIP) install --quiet uv; }
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--constraints constraints.txt --generate-hashes --no-emit-package mnistlab --quiet -o requirements.lock
	$(MAKE) install

## Train gap_cnn with the best recipe (the default), then test its best checkpoint.
## Overrides go in ARGS: make train ARGS="trainer.max_epochs=3 seed=2"
train: install
	$(PY) train.py $(ARGS)

## A grid of dropout x LR, 6 full runs (about 30 min on 2 CPU cores; shorten with ARGS).
sweep: install
	$(PY) train.py -m model.dropout=0.05,0.1,0.15 optimizer.lr=0.01,0.025 $(ARGS)

## logs/report.md and logs/report.png from every run under $(LOGS) (logs/debug/ left out).
report: install
	$(PY) -m mnistlab.report $(LOGS)

## weights/<model>.{pt,onnx,json} from the median-validation seed of a complete seed sweep:
## make release RUNS=logs/multiruns/<date>_<time>_<pid>  (several folders: RUNS="a b", a sweep run in parts;
## ARGS="partial=true" for an incomplete sweep, ARGS="overwrite=true" to replace better weights)
release: install
	$(PY) -m mnistlab.release "runs=[$(subst $(space),$(comma),$(strip $(RUNS)))]" $(ARGS)

## The GPU speedrun over seeds 1-3 (seed 0 first warms the compile caches); needs a GPU.
speedrun: install
	$(PY) train.py -m experiment=speedrun seed=0,1,2,3 $(ARGS)

## Per-epoch cost of our training path against a bare PyTorch loop (a few minutes; ARGS="--compile").
bench: install
	$(PY) -m mnistlab.bench $(ARGS)

## The page to draw a digit on, with the released weights: http://127.0.0.1:7860 (ARGS="port=8080").
demo: install
	$(PY) demo.py $(ARGS)

## Latency of the demo page over HTTP: median of 20 calls from another process (about a minute).
bench-demo: install
	$(PY) -m mnistlab.demo_bench $(ARGS)

## The fast test suite (offline apart from one MNIST fetch into data/ on first use).
test: install
	$(PY) -m pytest -m "not slow and not browser and not slurm and not postgres" -q

## The demo page driven in a real headless Chromium (Debian's package, installed when missing).
test-browser: install
	command -v chromium >/dev/null || scripts/install-chromium.sh
	$(PY) -m pytest -m browser -q

## Sweeps and a shared Optuna study on a real one-node SLURM cluster (scripts/slurm-local.sh:
## installed from Debian when missing, started, and stopped again after the tests).
test-slurm: install
	scripts/slurm-local.sh up
	SLURM_CONF=$${SLURM_LOCAL_DIR:-/tmp/mnistlab-slurm}/slurm.conf $(PY) -m pytest -m slurm -q; \
		status=$$?; scripts/slurm-local.sh down; exit $$status

## An Optuna study shared through a real PostgreSQL (scripts/postgres-local.sh: Debian's package,
## installed when missing, a throwaway server on 127.0.0.1, stopped again after the tests).
test-postgres: install
	$(PY) -c "import psycopg" 2>/dev/null || $(PIP) install --quiet "psycopg[binary]"  # SQLAlchemy's PostgreSQL driver
	MNISTLAB_POSTGRES_URL=$$(scripts/postgres-local.sh up) $(PY) -m pytest -m postgres -q; \
		status=$$?; scripts/postgres-local.sh down; exit $$status

## Everything: slow tests, the browser test and the SLURM tests included.
test-all: install
	$(PY) -m pytest -q -m "not browser and not slurm and not postgres"
	$(MAKE) test-browser test-slurm test-postgres

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

tensorboard: install
	@echo "TensorBoard for logs/ at http://127.0.0.1:6006"
	$(VENV)/bin/tensorboard --logdir logs --host 127.0.0.1 --port 6006

## Remove the environment and caches; data/, logs/ and weights/ are kept.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
