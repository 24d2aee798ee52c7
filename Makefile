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

# After installing, one Q8_0 batch is decoded in a subprocess: where the CPU lists AMX but faults on it, llama.cpp
# is rebuilt with AMX off and the flags are recorded (gatenorm_edge/native.py).
install: $(ENVIRONMENT)
	$(PYTHON) -m pip install -e '.[dev]'
	$(PYTHON) -m gatenorm_edge.native

test: install
	$(PYTHON) -m pytest -q -rs

bench: install
	$(PYTHON) -m bench.run $(BENCH)

demo: $(ENVIRONMENT)
	$(PYTHON) -m pip install -q -e '.[demo]'
	$(PYTHON) -m gatenorm_edge.native
	$(PYTHON) -m gatenorm_edge demo
