# `make test`: a fresh clone to a passing suite. Needs only python3 (3.10+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch on machines without a GPU; install a CUDA build first to use one
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# the whole suite, real-member tests included (they prepare SmolLM2/Gemma-3 once into $DEEPEN_HOME).
# JOBS test files at a time (pytest-xdist, a file's tests stay together so that the launcher runs
# they share happen once), one thread each: on 2 cores, 11 minutes instead of 14. JOBS=0: serial.
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile)

test: setup
	$(PYTEST)

# without the real members
test-fast: setup
	$(PYTEST) -m "not real"

# the main job on the built-in default ensemble: prepare the real members and anchors (once),
# then decode examples/prompts.jsonl and print each question with the ensemble's answer
demo: setup
	$(BIN)/deepen models prepare
	$(BIN)/deepen anchors build configs/smol-gemma.toml
	$(BIN)/deepen generate --config configs/smol-gemma.toml --input examples/prompts.jsonl \
		--output out/demo.jsonl --overwrite

clean:
	rm -rf $(VENV) *.egg-info
