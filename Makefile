# Two commands for a fresh machine: `make demo` runs the demo job, `make test` the test suite.
# Both set up .venv first. torch is installed before the package, pinned to the CPU build
# that lies on disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The torch that must still be installed after setup ('any' when TORCH is overridden).
TORCH_VERSION ?= $(if $(filter torch==2.13.0,$(TORCH)),2.13.0+cpu,any)

.PHONY: setup demo test lint bench clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,optuna]"
	# EK-FAC (kronfluence 1.0.1): its metadata asks for torchvision, which it never imports and
	# which would replace the CPU torch with a CUDA build. Install it without its dependencies.
	$(BIN)/pip install --quiet --no-deps kronfluence==1.0.1
	$(BIN)/pip install --quiet accelerate einops einconv opt-einsum
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; \
		print('torch', v); sys.exit(0 if v == '$(TORCH_VERSION)' or '$(TORCH_VERSION)' == 'any' \
		else 'torch was replaced: ' + v)"
	touch $@

demo: setup
	$(BIN)/untrac-ray run jobs/synthetic_a.yaml

test: setup browser
	$(BIN)/python -m pytest

# Headless Chromium and its driver for the end-to-end UI test: Debian packages, no download.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) .untrac-ray mlflow.db mlartifacts
