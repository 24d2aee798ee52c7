# `make demo` and `make test` install into a project virtual environment (.venv), never into the system
# Python; PYTHON=/path/to/python uses that interpreter as it is instead.
VENV := .venv
PYTHON ?= $(VENV)/bin/python
BOOTSTRAP ?= python3

ifeq ($(PYTHON),$(VENV)/bin/python)
ENVIRONMENT := $(VENV)/bin/python
endif

.PHONY: install test bench demo

$(VENV)/bin/python:
	$(BOOTSTRAP) -m venv $(VENV)

install: $(ENVIRONMENT)
	$(PYTHON) -m pip install -e '.[dev]'

test: install
	$(PYTHON) -m pytest -q -rs

bench: install
	$(PYTHON) -m bench.run $(BENCH)

demo: $(ENVIRONMENT)
	$(PYTHON) -m pip install -q -e '.[demo]'
	$(PYTHON) -m gatenorm_edge demo
