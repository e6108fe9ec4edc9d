# Every target installs from this repository's own files; torch is pinned in the same pip call
# so pip never pulls a CUDA build by itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart micro test lint format clean

$(BIN)/wmtp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $(BIN)/wmtp

setup: $(BIN)/wmtp

# The main job until the quickstart lands, offline on CPU: micro models (tokenizer included),
# the four datasets from the bundled sources, verification, and a short baseline run.
micro: setup
	$(BIN)/wmtp storage models --create-micro --micro-type mtp --micro-init random
	$(BIN)/wmtp storage models --create-micro --micro-type reference --micro-init random
	HF_HUB_OFFLINE=1 $(BIN)/wmtp storage datasets --datasets all --steps all
	$(BIN)/wmtp storage verify --check all --include-small
	$(BIN)/wmtp train configs/local/baseline.yaml log.mlflow=false

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) storage .pytest_cache .ruff_cache
