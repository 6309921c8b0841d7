# Two entry points: `make demo` and `make test`. Both create .venv with the pinned stack if needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := build/demo

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[akida,torch,keras,nir,zoo,bench,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m qanac.zoo.demo $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadscope

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadscope

clean:
	rm -rf $(VENV) build
