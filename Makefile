# Two commands for a fresh machine: `make demo` runs the demo job, `make test` the test suite.
# Both set up .venv first. torch is installed before the package, pinned to the CPU build
# that lies on disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The torch that must still be installed after setup ('any' when TORCH is overridden).
TORCH_VERSION ?= $(if $(filter torch==2.13.0,$(TORCH)),2.13.0+cpu,any)

.PHONY: setup demo test test-e2e lint bench clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,optuna,hf,ekfac]"
	# EK-FAC (kronfluence 1.0.1): its metadata asks for torchvision, which it never imports and
	# which would replace the CPU torch with a CUDA build. Its other parts came with the `ekfac`
	# extra; it goes in last and without dependencies, so no pip check reports the one omission.
	$(BIN)/pip install --quiet --no-deps kronfluence==1.0.1
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; \
		print('torch', v); sys.exit(0 if v == '$(TORCH_VERSION)' or '$(TORCH_VERSION)' == 'any' \
		else 'torch was replaced: ' + v)"
	touch $@

demo: setup
	$(BIN)/untrac-ray run jobs/synthetic_a.yaml

# The README's test command needs no system package: the browser tests (MLflow's own UI and the
# report page in headless Chromium) run where Chromium is installed, and are skipped, saying so,
# elsewhere.
test: setup
	$(BIN)/python -m pytest

# The browser test, with Chromium installed first (apt, as root or with sudo).
test-e2e: setup browser
	$(BIN)/python -m pytest -m e2e

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
