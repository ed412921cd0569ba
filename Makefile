# Thin aliases: the logic lives in scripts beside what they serve.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Barman (point-in-time recovery) lives in its own virtualenv: see docker/barman-requirements.txt.
BARMAN_VENV ?= .venv-barman
BARMAN_STAMP := $(BARMAN_VENV)/.installed

.PHONY: venv test test-unit test-integration test-monitoring lint fmt bench e2e

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(BARMAN_STAMP): docker/barman-requirements.txt
	test -x $(BARMAN_VENV)/bin/python || $(PYTHON) -m venv $(BARMAN_VENV)
	$(BARMAN_VENV)/bin/pip install -q --upgrade pip
	$(BARMAN_VENV)/bin/pip install -q -r docker/barman-requirements.txt
	touch $(BARMAN_STAMP)

venv: $(STAMP) $(BARMAN_STAMP)

test: $(STAMP) $(BARMAN_STAMP)
	$(BIN)/pytest tests/unit tests/integration tests/monitoring

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP) $(BARMAN_STAMP)
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
bench: $(STAMP) $(BARMAN_STAMP)
	$(BIN)/pytest -s tests/benchmarks

# --- The stack (docker-compose.yml); the logic lives in docker/stack.py --------------------------
# make up | down | ps | logs [SERVICE=ops] | backup | restore ID=... [TARGET_DB=name] [FORCE=1]
# make psql | demo (WORKLOAD_MODE=saturate for pool saturation) | e2e
# make recover [TIME='2026-11-28 14:05:00+00']   # point-in-time recovery of the live database
STACK := $(PYTHON) docker/stack.py

.PHONY: up down ps logs backup restore psql demo recover

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

restore:
	@test -n "$(ID)" || { echo "usage: make restore ID=<backup id> [TARGET_DB=name] [FORCE=1]" >&2; exit 2; }
	@$(STACK) restore '$(ID)' $(if $(TARGET_DB),--target-db '$(TARGET_DB)') $(if $(FORCE),--force)

psql:
	@$(STACK) psql

recover:
	@$(STACK) recover $(if $(TIME),--time '$(TIME)')

demo:
	@$(STACK) demo

# End to end on real containers: builds the image, runs the stack under its own project name and
# ports, and removes it afterwards. Needs a Docker engine. Bounded: after 15 minutes pytest is
# interrupted, which still tears the stack down.
e2e: $(STAMP)
	DBOPS_E2E=1 timeout --signal=INT --kill-after=120 900 $(BIN)/pytest -p no:cacheprovider tests/e2e
