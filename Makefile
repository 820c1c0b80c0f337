# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything first. torch/torchvision are pinned and installed before the package so that pip
# never pulls another build (these two versions install from local files on our machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/retinalens demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks/results.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache
