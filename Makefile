# Two entry points: `make demo` runs the end-to-end job, `make test` runs the suite.
# Each creates the virtual environment it needs. torch is pinned to the local CPU build
# and installed first, so no later step pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench torture clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,bench]" "$(TORCH_SPEC)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gpujobs demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

torture: $(STAMP)
	$(BIN)/python bench/torture.py --kills 200

clean:
	rm -rf $(VENV) .pytest_cache
