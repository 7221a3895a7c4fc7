# The two set-up commands of the README. Everything else is `acornlm --help`.
#
#   make demo   create .venv if missing, install acornlm, run the main job on the embedded corpus
#   make test   create/update .venv with the dev extras and run the whole test suite
#
# torch: if .venv has no torch yet, install $(TORCH) first. The default is the CPU-friendly
# pin torch==2.13.0 (a local CPU wheel on our machines). GPU users: create .venv and install
# the CUDA build first (see README), then run make: an installed torch is kept as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=

.PHONY: demo demo-agent test venv torch lint

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

torch: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH)"

venv: torch
	$(PIP) install --quiet -e ".[export,serve]"

demo: venv
	$(VENV)/bin/acornlm demo --out $(DEMO_DIR) $(DEMO_ARGS)

# tools, thinking and RLHF, measured (acornlm demo-agent; about 25 minutes on 2 cores)
demo-agent: venv
	$(VENV)/bin/acornlm demo-agent --out runs/demo-agent $(DEMO_ARGS)

test: torch
	$(PIP) install --quiet -e ".[dev]"
	@if [ -f tests/setup_browser.sh ]; then bash tests/setup_browser.sh; fi
	$(PY) -m pytest -q

lint: torch
	$(VENV)/bin/ruff check .
