# Two commands for a fresh machine: `make demo` runs the demo job, `make test` the test suite.
# Both set up .venv first. torch is installed before the package, pinned to the CPU build
# that lies on disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $@

demo: setup
	$(BIN)/untrac-ray run jobs/synthetic_a.yaml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) .untrac-ray mlflow.db mlartifacts
