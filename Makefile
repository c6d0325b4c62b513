# Quick start: `make demo` (set-up + a short training run with metrics), `make test` (set-up + tests).
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu bench clean-venv

install:
	bash tools/install.sh

demo: install
	$(VENV_PY) tools/demo.py

test: install
	bash tools/run_tests.sh $(PYTEST_ARGS)

test-gpu: install
	$(VENV_PY) -m pytest -m gpu tests

bench: install
	$(VENV_PY) benchmarks/bench_vim.py

clean-venv:
	rm -rf .venv
