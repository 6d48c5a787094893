# The README's two commands: `make demo` and `make test`. Both work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# pytest-xdist workers of `make test` (tests/conftest.py groups the tests that share a run); each has its own
# local Ray (memory: docs/benchmarks.md). `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 3

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are named first so pip resolves the pair that exists for this machine.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch>=2.4,<2.16" "torchvision>=0.19,<0.31"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# RAY_AUTH_MODE chosen explicitly (Ray's default for a local cluster, token) is respected without a WARNING
demo: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(BIN)/python pipelines/demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data/ mlflow.db mlartifacts/ ray_results/
