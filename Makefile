# `make test`: a fresh clone to a passing suite. Needs only python3 (3.10+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch on machines without a GPU; install a CUDA build first to use one
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# the whole suite, real-member tests included (they prepare SmolLM2/Gemma-3 once into $DEEPEN_HOME)
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# without the real members
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not real"

clean:
	rm -rf $(VENV) *.egg-info
