# Everything runs inside a local virtual environment that `make install` creates; every target sets it up itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Without a GPU, take torch's CPU build (a few hundred MB) instead of PyPI's default CUDA build (several GB): torch
# alone from the CPU index, then its dependencies from PyPI (the CPU index is asked for one package only).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install test test-all run sort-cpu-study reproduce results lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q "torch>=2.1"; \
	else \
		$(BIN)/python -m pip install -q --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) || { \
			echo "make install: could not get torch $(TORCH_VERSION)'s CPU build from $(TORCH_CPU_INDEX); install torch" \
				"yourself (https://pytorch.org) into $(VENV), then run make again."; exit 1; }; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
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

# The CPU sorting study of docs/results.md: five models x three lengths x two seeds (experiment=sort_cpu), the two
# seeds side by side (one core each), then its report (results/sort_cpu_study/report.md and its figure).
SORT_CPU_MODELS ?= memoria_gpt2_sort_cpu,gpt2_sort_cpu,transformer_xl_sort_cpu,compressive_sort_cpu,infinity_former_sort_cpu
sort-cpu-study: install
	for seed in 1 2; do \
		OMP_NUM_THREADS=1 $(BIN)/memoria-exp -m experiment=sort_cpu model=$(SORT_CPU_MODELS) task.data.length=44,108,172 \
			seed=$$seed trainer.enable_progress_bar=false hydra.sweep.dir=multirun/sort_cpu_study/seed$$seed & \
	done; wait
	$(BIN)/python scripts/collect_results.py multirun/sort_cpu_study --out results/sort_cpu_study

# The paper's tables on a GPU machine with internet (days of GPU time): WikiText-103, PG-19 and enwik8 for every model,
# then the sorting grid (lengths x segment sizes) for every model; `make results` tables what has finished.
# Narrow it, e.g. make reproduce REPRODUCE_MODELS="memoria_gpt2 gpt2" SORT_LENGTHS=1000,4000 REPRODUCE_ARGS=trainer=ddp
REPRODUCE_MODELS ?= memoria_gpt2 gpt2 transformer_xl compressive infinity_former
SORT_LENGTHS ?= 1000,2000,4000,8000,16000,32000
SORT_SEGMENTS ?= 256,512,1024
REPRODUCE_ARGS ?=
reproduce: install
	set -e; for model in $(REPRODUCE_MODELS); do \
		$(BIN)/memoria-exp experiment=wikitext103 model=$$model $(REPRODUCE_ARGS); \
		$(BIN)/memoria-exp experiment=pg19 model=$$model $(REPRODUCE_ARGS); \
		$(BIN)/memoria-exp experiment=enwik8 model=$${model}_enwik8 $(REPRODUCE_ARGS); \
	done; \
	for model in $(REPRODUCE_MODELS); do \
		$(BIN)/memoria-exp -m experiment=sort_paper model=$${model}_sort task.data.length=$(SORT_LENGTHS) \
			task.module.segment_size=$(SORT_SEGMENTS) $(REPRODUCE_ARGS); \
	done
	$(BIN)/python scripts/collect_results.py

results: install  # results/report.md and results/figures/: every run under outputs/ and multirun/, seeds averaged
	$(BIN)/python scripts/collect_results.py

lint: install
	$(BIN)/ruff check memoria experiment tests scripts

clean:
	rm -rf outputs multirun .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
