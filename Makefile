# fourdstream: the two commands of the README are `make demo` and `make test`.
# Both set everything up first (scripts/setup.sh: system MPI + parallel HDF5,
# a virtual environment, h5py built with MPI and cached); a second run takes seconds.

VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo-output
export VENV

.PHONY: setup setup-test demo test clean

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

## Main job: simulated 4D Camera scan -> counted file + summary.
demo: setup
	@$(VENV)/bin/fourdstream demo --output $(DEMO_DIR)

## The test suite (unit tests and real mpiexec runs).
test: setup-test
	@$(PY) -m pytest

clean:
	rm -rf $(VENV) .venv-py4dstem $(DEMO_DIR) .pytest_cache
