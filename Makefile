# One command each on a fresh machine: every target that needs the environment builds it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lorakit train examples/quickstart.yaml

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_step.py
	$(PY) bench/bench_train_memory.py
	$(PY) bench/bench_qlora.py
	$(PY) bench/bench_per_sample.py
	$(PY) bench/bench_routing.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_preference.py
	$(PY) bench/bench_grpo_learning.py
	$(PY) bench/bench_gpu.py

lint: setup
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
