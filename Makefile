# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3

.PHONY: install demo test bench lint

# torch first, pinned: on a machine with no torch, a bare requirement would pull a multi-GB CUDA build.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m rrto_lab.demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m benchmarks

lint:
	$(PYTHON) -m ruff check .
