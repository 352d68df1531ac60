# Quickstart targets: `make demo` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the torch build to install; override e.g. TORCH="torch torchvision" to take the newest
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= output_dir/demo

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# pre-train DeepMIM (pixel target, layers 6/8/10/12) on the built-in digits, on CPU
demo: install
	$(BIN)/python main_pretrain.py --data_path digits --model deepmim_vit_tiny_patch4 --device cpu \
		--norm_pix_loss --epochs 12 --warmup_epochs 2 --batch_size 64 --blr 1.5e-3 \
		--num_workers 1 --log_every 11 --save_every 4 --output_dir $(DEMO)/pretrain --no_auto_resume

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) output_dir
