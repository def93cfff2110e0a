# fdtrain: the two Quickstart commands (`make demo`, `make test`) and their environment.
# Each target creates .venv on first use; nothing has to be installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dali,deepspeed,dev
DEMO_DATA ?= data/synth
DEMO_SHARDS ?= shards/demo

FD := $(PY) -m fdtrain
DEMO_HOLDOUT ?= NeuralTextures

.PHONY: venv demo test lint clean-demo gpu-bundle

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

# The whole suite: lint, then every test a CPU can run (multi-process, DeepSpeed and SLURM included),
# on TEST_WORKERS pytest-xdist workers, one test module per worker at a time (tests/conftest.py).
TEST_WORKERS ?= 2
test: venv
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --timeout=900 --durations=25 -n $(TEST_WORKERS) --dist loadfile

# The main job on the embedded default: synthetic benchmark -> shards -> train (recipes/demo.yaml,
# CPU when there is no GPU) -> evaluate in-domain and on the held-out manipulation. Starts fresh.
demo: venv
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) runs/demo
	$(FD) synth --out $(DEMO_DATA) --seed 42
	$(FD) shards make --source synth --root $(DEMO_DATA) --methods Deepfakes,Face2Face,FaceSwap \
	    --holdout-tests --out $(DEMO_SHARDS)
	$(FD) shards verify $(DEMO_SHARDS)
	$(FD) train recipes/demo.yaml
	$(FD) evaluate --checkpoint runs/demo --data $(DEMO_SHARDS) --name test,test_$(DEMO_HOLDOUT) \
	    --out runs/demo/demo_eval.json
	@echo "test = in-domain (Deepfakes, Face2Face, FaceSwap, seen in training); test_$(DEMO_HOLDOUT) = held out"
	@echo "Look at the run: $(VENV)/bin/tensorboard --logdir runs/demo"

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) runs/demo

# Wheels that launch/gpu_check.sh installs offline on a GPU node that lacks them (torch, timm,
# accelerate, tensorboard are expected there; DALI is not bundled: 200 MB). Pure-Python wheels,
# pinned to the versions tested here; carried with the tree (gpu_bundle/ is git-ignored).
GPU_BUNDLE ?= gpu_bundle
GPU_BUNDLE_PKGS ?= webdataset==1.0.2 braceexpand==0.1.7
gpu-bundle:
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 -d $(GPU_BUNDLE) $(GPU_BUNDLE_PKGS)
	@du -sh $(GPU_BUNDLE); ls $(GPU_BUNDLE)
