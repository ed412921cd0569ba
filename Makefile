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
# make up | down | ps | logs [SERVICE=ops] | backup | backups | verify [ID=...] [DRILL=1]
# make restore ID=... [TARGET_DB=name] [FORCE=1] | psql | demo (WORKLOAD_MODE=saturate) | demo-stop
# Each runs in the stack's containers (the sidecar for backups); `ops` on the host is for host
# installs.
STACK := $(PYTHON) docker/stack.py
# A make variable as one shell word, whatever quotes it holds.
quote = '$(subst ','\'',$(1))'

.PHONY: up down ps logs backup backups verify restore psql demo demo-stop

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

backups:
	@$(STACK) backups $(if $(ALL),--all)

verify:
	@$(STACK) verify $(if $(DRILL),--drill) $(if $(ID),-- $(call quote,$(ID)))

restore:
	@test -n $(call quote,$(ID)) || { echo "usage: make restore ID=<backup id> [TARGET_DB=name] [FORCE=1] (make backups lists the ids)" >&2; exit 2; }
	@$(STACK) restore $(if $(TARGET_DB),--target-db $(call quote,$(TARGET_DB))) $(if $(FORCE),--force) -- $(call quote,$(ID))

psql:
	@$(STACK) psql

demo:
	@$(STACK) demo

demo-stop:
	@$(STACK) demo-stop

# End to end on real containers: builds the image, runs the stack under its own project name and
# ports, and removes it afterwards. Needs a Docker engine. Bounded: after 15 minutes pytest is
# interrupted, which still tears the stack down.
e2e: $(STAMP)
	DBOPS_E2E=1 timeout --signal=INT --kill-after=120 900 $(BIN)/pytest -p no:cacheprovider tests/e2e
