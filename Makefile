# kdray: every target sets up the local virtual environment (.venv) first, from pyproject.toml.
#   make demo   run the default sweep (MNIST-1D, offline) and print the champion
#   make test   lint (ruff, the import layers) and the whole test suite
#   make test-fast  the unit tests only (< 2 min): for iteration
#   make lint   ruff, and import-linter's layer and no-cycle contracts (pyproject.toml)
#   make results  the README's results tables (sweeps + kdray final --per-type over 5 seeds, ~15 min)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdray-installed

.PHONY: install demo test test-fast lint benchmark results clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/kdray sweep

lint: install
	$(VENV)/bin/ruff check kdray tests benchmarks
	$(VENV)/bin/lint-imports

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q tests/unit

benchmark: install
	$(PY) benchmarks/run_all.py

results: install
	$(PY) benchmarks/results_table.py

clean:
	rm -rf $(VENV) kdray_runs mlflow.db mlartifacts
