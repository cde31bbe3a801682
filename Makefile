# Every target creates and uses its own virtual environment in .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint format clean bench reproduce reproduce-full

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_bench.py

# `make reproduce`: the paper's comparison on the embedded MovieLens (offline) -> experiments/results/.
# `make reproduce-full DATASETS=movielens,movielens-100k,gowalla MIRROR=../shared/data`: the whole matrix.
# Both resume: finished runs and evaluated cells are reused. Optional: JOBS=n (parallel training runs).
DATASETS ?=
MIRROR ?=
JOBS ?=
REPRODUCE_ARGS = $(if $(DATASETS),--datasets $(DATASETS)) $(if $(MIRROR),--mirror $(MIRROR)) $(if $(JOBS),--jobs $(JOBS))

reproduce: setup
	$(BIN)/python -m sparcode_cli.reproduce --matrix reproduce $(REPRODUCE_ARGS)

reproduce-full: setup
	$(BIN)/python -m sparcode_cli.reproduce --matrix reproduce-full $(REPRODUCE_ARGS)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
