# Thin aliases: the logic lives in scripts beside what they serve.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit test-integration test-monitoring test-kubernetes lint fmt bench e2e
.PHONY: checkov k8s-generate

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# checkov (tests/kubernetes) in a virtualenv of its own: it pins boto3 and packaging exactly.
CHECKOV_STAMP := .venv-checkov/.installed

$(CHECKOV_STAMP): tests/kubernetes/checkov-requirements.txt
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q -r tests/kubernetes/checkov-requirements.txt
	touch $(CHECKOV_STAMP)

checkov: $(CHECKOV_STAMP)

test: $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/pytest tests/unit tests/integration tests/monitoring tests/kubernetes

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration

test-monitoring: $(STAMP)
	$(BIN)/pytest tests/monitoring

# deploy/kubernetes, statically: kustomize v5 (kubectl), kubernetes-validate, CRD schemas,
# promtool, checkov. No cluster needed.
test-kubernetes: $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/pytest tests/kubernetes

# Rewrite deploy/kubernetes' generated files after a change under monitoring/.
k8s-generate: $(STAMP)
	$(BIN)/python deploy/kubernetes/generate.py

lint: $(STAMP)
	$(BIN)/ruff check db ops tests deploy
	$(BIN)/ruff format --check db ops tests deploy
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format db ops tests deploy
	$(BIN)/ruff check --fix db ops tests deploy

# Benchmarks print ratios against a baseline measured in the same run; they assert no time.
bench: $(STAMP)
	$(BIN)/pytest -s tests/benchmarks

# --- The stack (docker-compose.yml); the logic lives in docker/stack.py --------------------------
# make up | down | ps | logs [SERVICE=ops] | backup | restore ID=... [TARGET_DB=name] [FORCE=1]
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

restore:
	@test -n "$(ID)" || { echo "usage: make restore ID=<backup id> [TARGET_DB=name] [FORCE=1]" >&2; exit 2; }
	@$(STACK) restore '$(ID)' $(if $(TARGET_DB),--target-db '$(TARGET_DB)') $(if $(FORCE),--force)

psql:
	@$(STACK) psql

demo:
	@$(STACK) demo

# End to end on real containers: builds the image, runs the stack under its own project name and
# ports, and removes it afterwards. Needs a Docker engine. Bounded: after 15 minutes pytest is
# interrupted, which still tears the stack down.
e2e: $(STAMP)
	DBOPS_E2E=1 timeout --signal=INT --kill-after=120 900 $(BIN)/pytest -p no:cacheprovider tests/e2e
