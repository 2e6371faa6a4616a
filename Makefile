# make demo: the offline demo on the built-in sandbox provider. make test: the test suite.
# Both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench bench-quick bench-proxy clean

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
	$(BIN)/python -m bench.shadow
	-$(MAKE) bench-proxy
	$(BIN)/python -m bench.gateway

# LiteLLM's proxy, for bench.gateway to compare with, in a virtualenv of its own (litellm[proxy] pins many
# packages): the litellm version of .ci/constraints.txt. A failed install leaves the bench saying so.
PROXY_VENV := bench/.proxy-venv
bench-proxy: $(PROXY_VENV)/bin/litellm

$(PROXY_VENV)/bin/litellm: .ci/constraints.txt
	$(PYTHON) -m venv $(PROXY_VENV)
	$(PROXY_VENV)/bin/pip install --quiet "litellm[proxy]==$$(sed -n 's/^litellm==//p' .ci/constraints.txt)"

bench-quick: $(STAMP)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[bench]'
	$(BIN)/python -m bench --quick
	$(BIN)/python -m bench.state --quick
	$(BIN)/python -m bench.ledger --quick
	$(BIN)/python -m bench.tracing --rounds 3 --calls 100
	$(BIN)/python -m bench.hedge --calls 200 --rounds 2
	$(BIN)/python -m bench.shadow --calls 60 --rounds 2
	$(BIN)/python -m bench.gateway --quick

clean:
	rm -rf $(VENV) $(PROXY_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
