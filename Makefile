# The README's two commands: `make demo` (the whole lifecycle on the built-in synthetic set) and
# `make test` (the test suite). Each creates its own virtual environment from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine takes the local CPU wheel; on a GPU machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
# lmms-eval 0.7.3 must be installed without its dependencies (they would replace torch), then this list.
LMMS_EVAL_DEPS := loguru sacrebleu evaluate pytz tenacity pytablewriter decord levenshtein 'filelock<4'

.PHONY: install demo replicate test lint clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	$(PY) -m pip install -q $(LMMS_EVAL_DEPS)
	touch $@

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

# The miniature replication (docs/replication.md): 5 arms x 3 seeds, on demand, not in CI.
replicate: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/replicate.sh

# Lint, format check, then the whole suite on TEST_WORKERS xdist workers (one torch thread each); each test module
# stays on one worker (tests/conftest.py). `pytest -m "not slow"` skips the long end-to-end tests.
TEST_WORKERS ?= 2
test: lint
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(VENV)/bin/ruff check dsvlm tests benchmarks
	$(VENV)/bin/ruff format --check dsvlm tests benchmarks

clean:
	rm -rf $(VENV) runs data
