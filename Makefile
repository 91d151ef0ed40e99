# Two commands do all set-up: `make lab` and `make test`. Both create .venv when it is missing
# and install the exact versions pinned in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
LAB_PORT ?= 8888
LAB_DIR ?= lab
PYTEST := $(BIN)/python -m pytest
# The floor: the oldest versions pyproject.toml admits, pinned in constraints-oldest.txt.
OLDEST ?= .venv-oldest

.PHONY: help lab lab-reset test test-oldest lint typecheck unit nbval browser bench bench-smoke chromium openmpi zh clean

help:
	@echo "make lab    - install into $(VENV) and serve JupyterLab on $(LAB_DIR)/, a git-ignored copy of notebooks/ (prints the URL)"
	@echo "make lab-reset - replace $(LAB_DIR)/ with a fresh copy of notebooks/"
	@echo "make test   - install into $(VENV) and run lint, unit tests, nbval, browser tests, then test-oldest"
	@echo "make test-oldest - run the unit tests on the oldest supported versions ($(OLDEST))"
	@echo "make bench  - run the benchmark suite (prints ratios, writes benchmarks/results.json)"
	@echo "make zh     - sync notebooks/zh/po/*.po with the English notebooks, then build notebooks/zh/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.lab-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[notebook]'
	touch $@

$(VENV)/.test-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

# The tutorials are served from $(LAB_DIR)/, a git-ignored working copy of notebooks/, so that
# running them (JupyterLab autosaves) never rewrites the tracked notebooks, which are nbval's
# fixtures. The copy is made when it is missing and kept after that, with your edits;
# `make lab-reset` replaces it with a fresh copy of notebooks/.
# Root (as in a container) needs --allow-root; JupyterLab listens on localhost only and prints
# the URL to open (with its token); it opens no browser.
lab: $(VENV)/.lab-installed $(LAB_DIR)/.copied
	@echo "Serving $(LAB_DIR)/, a working copy of notebooks/ (refresh it with make lab-reset)."
	$(BIN)/jupyter lab --notebook-dir=$(LAB_DIR) --no-browser --ServerApp.port=$(LAB_PORT) \
	  --ServerApp.port_retries=50 $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# cp -R keeps notebooks/zh/scripts a relative symbolic link (to ../scripts), valid in the copy.
$(LAB_DIR)/.copied:
	rm -rf $(LAB_DIR)
	mkdir -p $(LAB_DIR)
	cp -R notebooks/. $(LAB_DIR)/
	touch $@

lab-reset:
	rm -rf $(LAB_DIR)
	$(MAKE) $(LAB_DIR)/.copied

test: $(VENV)/.test-installed chromium openmpi
	$(MAKE) lint typecheck unit nbval browser bench-smoke test-oldest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The package is type-checked at zero errors (settings in pyproject.toml's [tool.mypy]).
typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed
	NNX_CKPT_CONSTRAINTS=constraints.txt $(PYTEST) tests -m "not browser"

# Only what the unit tests need (the `test` extra), at the floor. The notebooks stay pinned to
# the newest versions (their stored outputs come from them), so nbval does not run here.
$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --disable-pip-version-check -q -c constraints-oldest.txt \
	  -e '.[test]'
	touch $@

test-oldest: $(OLDEST)/.installed
	NNX_CKPT_CONSTRAINTS=constraints-oldest.txt $(OLDEST)/bin/python -m pytest tests -m "not browser"

# Strict nbval: every stored output is compared, after tests/nbval_sanitize.cfg. The Chinese
# edition too: nbval starts each kernel in the notebook's folder, and notebooks/zh/scripts
# links to ../scripts, so the zh notebooks find what the English ones find.
nbval: $(VENV)/.test-installed
	$(PYTEST) --nbval notebooks/*.ipynb notebooks/zh/*.ipynb --nbval-sanitize-with tests/nbval_sanitize.cfg

browser: $(VENV)/.test-installed
	$(PYTEST) tests -m browser

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks

# The benchmarks at toy sizes, once, for correctness only (no timing is judged).
bench-smoke: $(VENV)/.test-installed
	NNX_CKPT_BENCH=smoke $(BIN)/python -m benchmarks

# The browser tests drive Debian's chromium. Install it when we can (root with apt-get);
# otherwise the tests skip with a loud reason (and fail under CI=true).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "WARNING: chromium is missing and cannot be installed here: browser tests will be skipped"; \
	  fi; \
	fi

# The mpirun test (tests/test_mpirun.py) starts the multi-process scripts with Debian's Open MPI.
# Install it when we can (root with apt-get); otherwise that test skips (and fails under CI=true).
openmpi:
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's openmpi-bin for the mpirun test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin >/dev/null; \
	  else \
	    echo "WARNING: mpirun is missing and cannot be installed here: the mpirun test will be skipped"; \
	  fi; \
	fi

# The Chinese edition (notebooks/zh/README.md): add new English markdown cells to the .po
# files (changed ones become fuzzy), then regenerate every zh notebook whose translation is
# complete. It fails, listing what to translate, while any translation is incomplete.
zh: $(VENV)/.test-installed
	$(BIN)/python tools/zh_notebooks.py update
	$(BIN)/python tools/zh_notebooks.py build

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .ruff_cache .hypothesis build *.egg-info
