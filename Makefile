# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser test demo lint bench clean

setup: $(STAMP)

# torch/torchvision first and pinned: these builds lie on the local disk; an unpinned torch pulls a multi-GB download.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Headless Chromium + chromedriver for the dashboard's browser test (tests/test_ui_browser.py), from Debian's
# packages when apt-get can be used; the test says why it is skipped when neither can be had.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null)) \
	  || echo "browser: could not install chromium chromium-driver; the browser test will be skipped"; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
	  || echo "browser: could not install chromium chromium-driver (needs root); the browser test will be skipped"; \
	else echo "browser: no apt-get; install chromium and chromedriver to run the browser test"; fi

test: setup browser
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: setup
	$(VENV)/bin/vlmtune demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf runs .pytest_cache
