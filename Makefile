# kdray: every target sets up the local virtual environment (.venv) first, from pyproject.toml.
#   make demo   run the default sweep (MNIST-1D, offline) and print the champion
#   make test   lint (ruff, the import layers) and the whole test suite
#   make test-fast  the unit tests only (< 2 min): for iteration
#   make lint   ruff, and import-linter's layer and no-cycle contracts (pyproject.toml)
#   make results  the README's results tables (sweeps + kdray final --per-type over 5 seeds, ~15 min)
#   make gpu-proof  the GPU path proved on one GPU in <= 8 min (benchmarks/gpu_proof.py; results/gpu_proof.json)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdray-installed

.PHONY: install demo test test-fast lint benchmark results gpu-proof clean

install: $(STAMP)

# uv (from PyPI) installs the same requirements as pip, resolved from pyproject.toml, in ~30 s where pip takes
# ~3.5 min (measured: benchmarks/bench_newcomer.py). uv does not read pip's configuration, so the constraints
# pip is configured with on this machine (PIP_CONSTRAINT, or pip config's global.constraint) are passed on.
# Without uv (no PyPI access for it), pip installs everything as before.
# --compile-bytecode: pip compiles at install, uv does not; where PYTHONDONTWRITEBYTECODE is set (as on this
# project's machines) every kdray command and Ray worker would otherwise compile MLflow, Ray and torch anew
# (kdray best: 5.9 s instead of 2.6 s).
PIP_CONSTRAINTS := $(or $(PIP_CONSTRAINT),$(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$$/\1/p"))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install --quiet --disable-pip-version-check uv; then \
	  $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) $(foreach c,$(PIP_CONSTRAINTS),--constraint $(c)) -e '.[test]'; \
	else \
	  $(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'; \
	fi
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

gpu-proof: install
	$(PY) benchmarks/gpu_proof.py

clean:
	rm -rf $(VENV) kdray_runs mlflow.db mlartifacts
