# Two commands do all set-up on a fresh machine:
#   make demo   - installs, then edits a bundled sample photo with the embedded default models
#   make test   - installs, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install protos demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the local CPU wheel; any other version would pull GBs of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed protos

protos: $(VENV)/.installed
	$(PY) -m faceedit.protos

demo: install
	$(PY) -m faceedit demo --out out/demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out faceedit/v1/*_pb2*.py*
