# Quick start: `make demo` (set-up + a short training run with metrics), `make test` (set-up + tests).
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-cov test-gpu lint format bench clean-venv

install:
	bash tools/install.sh

demo: install
	$(VENV_PY) tools/demo.py

test: install
	bash tools/run_tests.sh $(PYTEST_ARGS)

# the suite without the training runs through the stock tools (tests marked slow)
test-fast: install
	bash tools/run_tests.sh -m "not slow" $(PYTEST_ARGS)

# the whole suite with a line-coverage report of rat_plugins/ (terminal, and work_dirs/coverage/)
test-cov: install
	bash tools/run_tests.sh --cov --cov-report=term-missing:skip-covered \
		--cov-report=html:work_dirs/coverage $(PYTEST_ARGS)

test-gpu: install
	$(VENV_PY) -m pytest -m gpu tests

lint: install
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .

format: install
	$(VENV_PY) -m ruff format .
	$(VENV_PY) -m ruff check --fix .

bench: install
	$(VENV_PY) benchmarks/bench_vim.py

clean-venv:
	rm -rf .venv
