# fdtrain: the two Quickstart commands (`make demo`, `make test`) and their environment.
# Each target creates .venv on first use; nothing has to be installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dali,deepspeed,dev
DEMO_DATA ?= data/synth
DEMO_SHARDS ?= shards/demo

.PHONY: venv demo test lint clean-demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

# The whole suite: lint, then every test a CPU can run (multi-process, DeepSpeed and SLURM included).
test: venv
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --timeout=900

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) runs/demo
