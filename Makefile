# Two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: install demo simulation test lint bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

# The paper's three steps offline on CPU: tiny Stable Diffusion, synthetic images, random-backbone reward
# (the commands are in rcgdm/demo.py).
demo: install
	$(PY) -m rcgdm.demo $(DEMO_DIR)

# The paper's simulation with the answer known (simulation.py): under a minute on 2 CPU cores.
simulation: install
	$(PY) simulation.py --out_dir=simulation_out --overwrite=True

# Two test processes (pytest-xdist), one thread each, a test file per process at a time, the longest files first
# (tests/conftest.py: LONGEST_FIRST; --no-loadscope-reorder keeps that order).
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(PY) -m ruff check .

# Performance figures as ratios measured in one run (benchmarks/results.md); not part of `make test`.
bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(DEMO_DIR) simulation_out .pytest_cache .ruff_cache
