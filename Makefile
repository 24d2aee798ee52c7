PYTHON ?= python3

.PHONY: install test bench demo

install:
	$(PYTHON) -m pip install -e '.[dev]'

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m bench.run $(BENCH)

demo:
	$(PYTHON) -m pip install -q -e '.[demo]'
	gatenorm-edge demo
