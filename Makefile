# Two commands on a fresh machine: `make demo` and `make test`.
# A GPU user picks a CUDA build of torch with TORCH_INDEX, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_INDEX ?=
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install install-dev demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install -q -c constraints.txt $(TORCH_INDEX_FLAG) torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q -c constraints.txt -e '.[harness]'
	$(PIP) install -q -c constraints.txt setuptools wheel
	$(PIP) install -q --no-build-isolation -c constraints.txt 'deepspeed>=0.19,<0.20'
	touch $@

# Chromium for the web UI's browser test (tests/webui/test_browser.py, skipped without one): Debian's package, as
# root; Playwright's own browser download needs the internet at large.
$(VENV)/.browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no Chromium installed: the web UI's browser test will be skipped (apt-get install chromium)"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev $(VENV)/.browser

demo: install
	$(VENV)/bin/xtune demo

test: install-dev
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
