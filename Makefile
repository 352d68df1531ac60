# Quickstart targets: `make demo` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the torch build to install; override e.g. TORCH="torch torchvision" to take the newest
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= output_dir/demo
SEG_DEMO ?= output_dir/seg_demo
DET_DEMO ?= output_dir/det_demo
GPU_CHECK ?= output_dir/gpu_check
# pytest-xdist workers of `make test` (one torch thread each): one per core
TEST_WORKERS ?= 2

.PHONY: install demo seg-demo det-demo test test-all lint clean experiments gpu-check gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the requirements, then the project itself, editable (pyproject.toml), so that scripts, tools and tests import it
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH) -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# pre-train DeepMIM (pixel target, layers 6/8/10/12) on the built-in digits on CPU, then fine-tune it
demo: install
	$(BIN)/python tools/demo.py --output_dir $(DEMO)

# train UperNet on a ViT-Ti/4 from scratch on the built-in synthetic ADE20K-layout data on CPU, then evaluate
seg-demo: install
	$(BIN)/python Segmentation/demo.py --output_dir $(SEG_DEMO)

# pre-train a ViT-Ti/4 on the built-in synthetic COCO-layout images, then train ViTDet's Mask R-CNN on it and on a
# random backbone on CPU, and print both COCO APs
det-demo: install
	$(BIN)/python Detection/demo.py --output_dir $(DET_DEMO)

# the small study (EXPERIMENTS.md): plain MAE vs DeepMIM, 3 seeds each, on the built-in digits (12 to 20 min on 2 idle cores)
experiments: install
	$(BIN)/python tools/run_experiments.py --output_dir experiments --work_dir output_dir/experiments

# the fast tier (every module; minutes on 2 cores): the tests marked slow (the demo's recipe, the long
# kill / resume series, torch.compile) are left to test-all. CPU only: the tests marked cuda are
# skipped here, with the reason; `make gpu-check` runs them on a GPU
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# everything: the fast tier and the slow tests (CI runs this)
test-all: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# the prepared GPU check (tools/GPU_CHECK.md): the cuda tests and the ViT-B benchmark rows into $(GPU_CHECK);
# DRY_RUN=1 runs every line of it on CPU with tiny settings
gpu-check: install
	PYTHON=$(BIN)/python bash tools/gpu_check.sh $(if $(DRY_RUN),--dry-run) $(GPU_CHECK)

# the wheels an offline GPU machine lacks, at the versions installed here, into .whl/ (needs PyPI)
gpu-wheels: install
	$(BIN)/python tools/gpu_check.py wheels .whl

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) output_dir deepmim.egg-info
