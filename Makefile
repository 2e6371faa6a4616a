# make demo: the offline demo on the built-in sandbox provider. make test: the test suite.
# Both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/llm-router demo

lint: $(STAMP)
	$(BIN)/ruff check router tests bench examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[bench]'
	$(BIN)/python -m bench
	$(BIN)/python -m bench.state
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.tracing
	$(BIN)/python -m bench.hedge

bench-quick: $(STAMP)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[bench]'
	$(BIN)/python -m bench --quick
	$(BIN)/python -m bench.state --quick
	$(BIN)/python -m bench.ledger --quick
	$(BIN)/python -m bench.tracing --rounds 3 --calls 100
	$(BIN)/python -m bench.hedge --calls 200 --rounds 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
