# Everything runs inside a local virtual environment that `make install` creates; every target sets it up itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Without a GPU, take torch's CPU build (a few hundred MB) instead of PyPI's default CUDA build (several GB).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install test test-all run lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q "torch>=2.1"; \
	else \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# One BLAS/OpenMP thread per process: the tests are many small ops, where threads only add overhead (about 4x faster
# on a 2-core machine).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install  # includes the slow tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

run: install  # the embedded default: a small Memoria GPT-2 on generated sorting data, CPU, a few minutes
	$(BIN)/memoria-exp

lint: install
	$(BIN)/ruff check memoria experiment tests scripts

clean:
	rm -rf outputs multirun .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
