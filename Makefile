# Thin aliases: the logic lives in scripts beside what they serve.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit test-integration test-monitoring lint fmt bench e2e

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest tests/unit tests/integration tests/monitoring

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration

test-monitoring: $(STAMP)
	$(BIN)/pytest tests/monitoring

lint: $(STAMP)
	$(BIN)/ruff check db ops tests
	$(BIN)/ruff format --check db ops tests
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format db ops tests
	$(BIN)/ruff check --fix db ops tests

# Benchmarks print ratios against a baseline measured in the same run; they assert no time.
bench: $(STAMP)
	$(BIN)/pytest -s tests/benchmarks
