# Every target installs from this repository's own files; torch is pinned in the same pip call
# so pip never pulls a CUDA build by itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bwrap quickstart ui test test-fast lint format clean

$(BIN)/wmtp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $(BIN)/wmtp

setup: $(BIN)/wmtp bwrap

# The evaluation sandbox runs every generated program in a bubblewrap jail. As root (a fresh
# container, CI) it is installed with apt; otherwise a missing bwrap is one line naming the package.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null); \
	  else echo "bubblewrap (bwrap) is missing: install the package 'bubblewrap' to evaluate generated code"; fi; }

# The main job, offline on CPU: the micro models and four datasets, the known-answer
# CodeContests source, the pretrained micro base, critic -> verifiable, baseline, ref_tuning ->
# rho1, held-out evaluation with self-speculative decoding, plain vs speculative, the report.
quickstart: setup
	$(BIN)/wmtp quickstart

# MLflow's UI on the storage's runs (127.0.0.1, port 5000 or a free one; PORT=5001, STORAGE=dir).
# The full mlflow package is the optional `ui` extra: installed here when missing.
ui: setup
	@$(BIN)/python -c "import flask, importlib.metadata as m; m.version('mlflow')" 2>/dev/null || \
	  $(BIN)/pip install -q torch==2.13.0 -e '.[dev,ui]' || { \
	  echo "could not install the ui extra: run $(BIN)/pip install -e '.[ui]' where PyPI is reachable"; exit 1; }
	$(BIN)/wmtp ui $(if $(PORT),--port $(PORT)) $(if $(STORAGE),--storage $(STORAGE))

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q --durations=25

# The fast tier: everything but the tests marked slow or distributed (about 1.5 minutes on 2 cores).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q -m "not slow and not distributed"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) storage .pytest_cache .ruff_cache
