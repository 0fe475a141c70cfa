# The two commands of the README:  make demo  (set up + main job)  and  make test.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
SHARED := ../shared
# pytest workers (pytest-xdist): one per core, at most 4 -- each worker imports torch and triton.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test test-slow setup browser clean gpu-check

setup: $(VENV)/.installed browser

# Headless Chromium for the inspection page's browser test (tests/frontend/test_inspect_chromium.py):
# Debian's package, installed when missing (as root, or with sudo that asks no password).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	    $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo "note: chromium could not be installed; tests/frontend/test_inspect_chromium.py needs it"

# torch first, CPU build from the local wheel; then the project (editable) with its test extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,oracles]"
	touch $@

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow"
	$(BIN)/python -m pytest -q -n $(WORKERS) -m slow   # the long suites (20k frontend mutants, 3k stdlib mutants end to end, fuzz runs, every Triton kernel compiled for sm_80/sm_90, the wheel in a fresh venv): ~7 min on two cores
	@if [ -f $(SHARED)/tools/conformance.py ]; then \
		$(BIN)/python $(SHARED)/tools/conformance.py --python $(BIN)/python; \
	else echo "conformance: $(SHARED) not found, skipped"; fi

test-slow: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) -m slow

# On a CUDA machine (not part of `test`): the triton backend against `reference` on every stdlib
# matrix / delta cell, then timed against fla's chunk ops and cuDNN's LSTM; writes
# benchmarks/gpu_latest.txt. GPU_PYTHON: a Python whose torch has CUDA (setup installs a CPU build).
GPU_PYTHON ?= $(BIN)/python
gpu-check:
	$(GPU_PYTHON) benchmarks/bench_gpu.py $(GPU_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
