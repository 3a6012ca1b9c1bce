# Everything runs in ./.venv, created on first use. torch is pinned and installed first: an
# unpinned torch would pull several GB of CUDA packages on machines that have no GPU.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup system-packages quickstart test test-fast lint clean

# DeepSpeed goes beside the venv, not in it (pyproject.toml says why): the DeepSpeed tests put
# $(VENV)/deepspeed on PYTHONPATH; its other requirements (torch, numpy, pydantic) are the venv's.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/deepspeed "deepspeed>=0.16" hjson py-cpuinfo ninja msgpack einops
	touch $@

setup: $(BIN)/.installed

# Debian packages the tests use (PostgreSQL, Chromium), installed when missing; lmforge itself needs none.
system-packages:
	bash scripts/system-packages.sh

quickstart: setup
	$(BIN)/lmforge train examples/quickstart.yaml

test: setup system-packages
	$(BIN)/python -m pytest -q

test-fast: setup system-packages
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
