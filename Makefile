PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so installing the package never pulls another torch build. Which wheel this
	# is depends on pip's configuration (the development machine's find-links holds a CPU wheel).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check explaind plugins tests benchmarks examples

test: $(STAMP) lint
	# One BLAS/OpenMP thread per pytest worker: two workers on two cores.
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/bench_recording.py
	$(PY) benchmarks/bench_engine.py --skip-baseline
	$(PY) benchmarks/bench_pruning.py
	$(PY) benchmarks/bench_validation.py
	$(PY) benchmarks/bench_distributed.py

demo: $(STAMP)
	# Trains, records, replicates and explains a small run that groks (a few minutes on 2 cores);
	# writes report/index.html.
	$(VENV)/bin/explaind demo --threads 1 --out report

clean:
	rm -rf $(VENV) build dist *.egg-info
