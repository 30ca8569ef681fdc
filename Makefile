# One-command setup: `make test` and `make demo` create .venv and install
# everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Two test workers (one per core), one BLAS thread each: the tests are many
# small CPU-bound models, which two threads per process would only oversubscribe.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache runs/demo
