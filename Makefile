# Two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

LOCK := requirements-lock.txt

.PHONY: install lock demo simulation test lint bench clean

# The ranges of requirements*.txt at the exact versions of the lock: the README's numbers from any fresh clone.
install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt -c $(LOCK)
	touch $(STAMP)

# Remake the lock: the newest releases within the ranges, resolved in a fresh virtualenv (then rerun make demo and
# make bench, and commit what changed: the README's numbers come from the lock).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip
	.lock-venv/bin/python -m pip install -r requirements.txt -r requirements-dev.txt
	{ sed -n '1,2p' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

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
	rm -rf $(DEMO_DIR) simulation_out bound_out .pytest_cache .ruff_cache .lock-venv
