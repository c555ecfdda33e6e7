# `make train` and `make test` set themselves up: a .venv, the project installed into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

LOGS   ?= logs

.PHONY: install train test test-all sweep report release bench lint tensorboard clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Train the seed's final network with the default recipe, then test its best checkpoint.
## Overrides go in ARGS: make train ARGS="trainer.max_epochs=3 seed=2"
train: install
	$(PY) train.py $(ARGS)

## The default grid: dropout x LR, 6 full runs (about 1.5 h on 2 CPU cores; shorten with ARGS).
sweep: install
	$(PY) train.py -m model.dropout=0.05,0.1,0.15 optimizer.lr=0.01,0.05 $(ARGS)

## logs/report.md and logs/report.png from every run under $(LOGS).
report: install
	$(PY) -m mnistlab.report $(LOGS)

## weights/gap_cnn.{pt,onnx,json} from the median-validation seed of a seed sweep:
## make release RUNS=logs/multiruns/<date>_<time>_<pid>
release: install
	$(PY) -m mnistlab.release $(RUNS)

## Per-epoch cost of our training path against a bare PyTorch loop (a few minutes; ARGS="--compile").
bench: install
	$(PY) -m mnistlab.bench $(ARGS)

## The fast test suite (offline apart from one MNIST fetch into data/ on first use).
test: install
	$(PY) -m pytest -m "not slow" -q

## Everything, slow tests included.
test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

tensorboard: install
	@echo "TensorBoard for logs/ at http://127.0.0.1:6006"
	$(VENV)/bin/tensorboard --logdir logs --host 127.0.0.1 --port 6006

## Remove the environment and caches; data/ and logs/ are kept.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
