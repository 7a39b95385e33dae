# `make demo` and `make test` are all a user needs on a fresh machine: both install .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1 are the builds known to work together here; elsewhere any
# recent pair works: `make install TORCH_PINS="torch torchvision"`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow demo lint clean export

include Makefile.finetune
include Makefile.report
include Makefile.bench
include Makefile.gpu

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,export]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The checks of minutes that make test leaves out (CI runs both); none marked is not a failure (exit 5).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || test $$? -eq 5

demo: $(STAMP)
	$(PY) experiments/main.py experiment=demo

# make export MODEL_DIR=outputs/.../models/bottle FORMAT=onnx|openvino|torchscript OUT=exports/bottle
FORMAT ?= onnx
export: $(STAMP)
	$(PY) experiments/export.py model_dir=$(MODEL_DIR) format=$(FORMAT) out=$(OUT) $(EXPORT_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check core extensions experiments tests

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
