# The two set-up commands: `make demo` (the main job) and `make test`.
# Each creates its own virtual environment(s); nothing is installed outside the checkout.

PYTHON ?= python3
VENV ?= .venv
DURATION ?= 60
LOOP ?= uvloop
METRICS_PORT ?= 9100
# Interpreters the suite runs on: every Python from 3.10 to 3.14 found on the machine.
TEST_PYTHONS ?= $(shell scripts/pythons.sh)
PIP_FLAGS ?= --quiet --disable-pip-version-check
# pytest processes per run of the suite (pytest-xdist; each test file stays in one of them;
# 0 runs the suite in pytest's own process).
TEST_WORKERS ?= 2

.PHONY: demo test test-one bench bench-quick lint typecheck clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/loopscope/_c/*.c src/loopscope/_c/*.h)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m loopscope.demo --loop $(LOOP) --duration $(DURATION) --metrics-port $(METRICS_PORT)

test:
	@test -n "$(TEST_PYTHONS)" || { echo "no Python 3.10 to 3.14 found"; exit 1; }
	@set -e; for py in $(TEST_PYTHONS); do \
	  $(MAKE) --no-print-directory test-one PYTHON=$$py VENV=.venv-$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	done

# One interpreter: `make test-one PYTHON=python3.12 VENV=.venv-3.12`.
# The suite runs twice: on the C accelerator (when it was built) and on the pure-Python path.
test-one: $(VENV)/.installed
	@echo "== tests on $$($(VENV)/bin/python --version), C accelerator"
	@$(VENV)/bin/python -c 'import os, sys; from loopscope import _hotpath as h; c = h.twin is not h.pure; print("hot path:", "C" if c else "pure Python (C accelerator not built)"); sys.exit(0 if c or not os.environ.get("CI") else "CI: the C accelerator was not built")'
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	@echo "== tests on $$($(VENV)/bin/python --version), pure Python (LOOPSCOPE_PURE_PYTHON=1)"
	LOOPSCOPE_PURE_PYTHON=1 $(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Benchmarks (benchmarks/README.md): their own venv with the peers; prints one table.
bench:
	benchmarks/setup-venv.sh
	benchmarks/.venv/bin/python -m benchmarks

bench-quick:
	benchmarks/setup-venv.sh
	benchmarks/.venv/bin/python -m benchmarks --quick

lint: $(VENV)/.installed
	$(VENV)/bin/pip install $(PIP_FLAGS) ruff mypy
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf .venv .venv-* build src/*.egg-info src/loopscope/*.so benchmarks/.venv
