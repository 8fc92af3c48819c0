# The two commands: `make demo` runs the gateway on its embedded defaults, `make test` runs
# lint, type checks and every test. Both build .venv from pinned versions on first use.
#
# PYTHON is the interpreter .venv is made with, so it matters only while .venv does not exist.
# Given explicitly (`make PYTHON=python3.12 demo`, or PYTHON in the environment), it must be
# the Python version .venv already has: otherwise make stops and says to `make clean` first.
# make never deletes or rebuilds an existing .venv by itself (it may be in use elsewhere).
PYTHON_GIVEN := $(if $(PYTHON),yes)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP_VERSION := 26.3
# Prints an interpreter's major.minor version: `$(PYTHON) -c '$(PYVERSION)'`.
PYVERSION := import sys; print("%d.%d" % sys.version_info[:2])
# What to run again after `make clean`, for the messages below.
GOALS := $(or $(MAKECMDGOALS),venv)

.PHONY: test demo lint typecheck pytest bench venv check-venv clean

venv: $(STAMP)

# check-venv is order-only: it runs on every call but never makes the stamp out of date.
$(STAMP): pyproject.toml constraints.txt | check-venv
	@if [ ! -e $(VENV) ]; then \
	  $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edge-gateway needs Python >= 3.11 (found " + sys.version.split()[0] + "); run: make PYTHON=python3.11 ...")' || exit 1; \
	  echo "$(PYTHON) -m venv $(VENV)"; \
	  $(PYTHON) -m venv $(VENV) || { \
	    rm -rf $(VENV); \
	    echo "error: '$(PYTHON) -m venv $(VENV)' failed (see above; on Debian and Raspberry Pi OS: sudo apt install python3-venv); removed the half-made $(VENV)" >&2; \
	    exit 1; \
	  }; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# A half-made .venv (an interrupted first run, `python -m venv --without-pip`, an interpreter
# removed or upgraded under it) would make every later command fail with an obscure error,
# and one made with another Python than an explicit PYTHON would be reused silently: stop
# with what to do instead.
check-venv:
	@if [ -e $(VENV) ]; then \
	  problem=; \
	  if [ ! -f $(VENV)/pyvenv.cfg ]; then \
	    problem="it has no pyvenv.cfg"; \
	  elif ! have=$$($(BIN)/python -c '$(PYVERSION)' 2>/dev/null); then \
	    problem="its python does not start (it was made with the Python in '$$(sed -n 's/^home *= *//p' $(VENV)/pyvenv.cfg)': removed, moved or upgraded?)"; \
	  elif ! $(BIN)/python -c 'import pip' 2>/dev/null; then \
	    problem="it has no pip (made with --without-pip, or its creation was interrupted)"; \
	  fi; \
	  if [ -n "$$problem" ]; then \
	    echo "error: $(VENV) is incomplete or broken: $$problem." >&2; \
	    echo "Delete it with 'make clean', then run 'make $(GOALS)' again to rebuild it." >&2; \
	    exit 1; \
	  fi; \
	  if [ -n "$(PYTHON_GIVEN)" ]; then \
	    want=$$($(PYTHON) -c '$(PYVERSION)') || { \
	      echo "error: PYTHON=$(PYTHON) does not run (is it installed?)" >&2; exit 1; }; \
	    if [ "$$want" != "$$have" ]; then \
	      echo "error: $(VENV) was made with Python $$have, but PYTHON=$(PYTHON) is Python $$want." >&2; \
	      echo "To rebuild $(VENV) with Python $$want: make clean && make PYTHON=$(PYTHON) $(GOALS)" >&2; \
	      echo "To keep using $(VENV) with Python $$have: leave PYTHON out (make $(GOALS))" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/edge-gateway demo

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
