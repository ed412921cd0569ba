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

# --- The stack (docker-compose.yml); the logic lives in docker/stack.py --------------------------
# make up | down | ps | logs [SERVICE=ops] | backup
# make restore ID=... [TARGET_DB=name] [FORCE=1] [REPLACE_LIVE=1] [ALLOW_POSTGRES_DB=1]
# make psql | demo (WORKLOAD_MODE=saturate for pool saturation) | e2e
STACK := $(PYTHON) docker/stack.py

.PHONY: up down ps logs backup restore psql demo

up:
	@$(STACK) up

down:
	@$(STACK) down

ps:
	@$(STACK) ps

logs:
	@$(STACK) logs --follow $(SERVICE)

backup:
	@$(STACK) backup

# Values reach the shell single-quoted, their own quotes escaped: a name is data, never a command.
quoted = '$(subst ','\'',$(1))'

restore:
	@test -n $(call quoted,$(ID)) || { echo "usage: make restore ID=<backup id> [TARGET_DB=name] [FORCE=1] [REPLACE_LIVE=1] [ALLOW_POSTGRES_DB=1]" >&2; exit 2; }
	@$(STACK) restore $(if $(TARGET_DB),--target-db=$(call quoted,$(TARGET_DB))) $(if $(FORCE),--force) $(if $(REPLACE_LIVE),--replace-live) $(if $(ALLOW_POSTGRES_DB),--allow-postgres-db) -- $(call quoted,$(ID))

psql:
	@$(STACK) psql

demo:
	@$(STACK) demo

# End to end on real containers: builds the image, runs the stack under its own project name and
# ports, and removes it afterwards. Needs a Docker engine. Bounded: after 15 minutes pytest is
# interrupted, which still tears the stack down.
e2e: $(STAMP)
	DBOPS_E2E=1 timeout --signal=INT --kill-after=120 900 $(BIN)/pytest -p no:cacheprovider tests/e2e
