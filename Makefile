# Thin aliases: the logic lives in scripts beside what they serve.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What the image and CI install: pyproject.toml's ranges resolved to their floors (the lowest
# versions we test). `make lock` regenerates it; `make test-newest` runs the suite on the newest
# releases the ranges admit.
LOCK := requirements.lock
NEWEST := .venv-newest
# Barman (point-in-time recovery) lives in its own virtualenv: see docker/barman-requirements.txt.
BARMAN_VENV ?= .venv-barman
BARMAN_STAMP := $(BARMAN_VENV)/.installed

.PHONY: venv lock test test-newest test-unit test-integration test-monitoring lint fmt bench e2e
.PHONY: test-kubernetes checkov k8s-generate

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

$(BARMAN_STAMP): docker/barman-requirements.txt
	test -x $(BARMAN_VENV)/bin/python || $(PYTHON) -m venv $(BARMAN_VENV)
	$(BARMAN_VENV)/bin/pip install -q --upgrade pip
	$(BARMAN_VENV)/bin/pip install -q -r docker/barman-requirements.txt
	touch $(BARMAN_STAMP)

venv: $(STAMP) $(BARMAN_STAMP)

lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--resolution lowest-direct --quiet -o $(LOCK)

# checkov (tests/kubernetes) in a virtualenv of its own: it pins boto3 and packaging exactly.
CHECKOV_STAMP := .venv-checkov/.installed

$(CHECKOV_STAMP): tests/kubernetes/checkov-requirements.txt
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q -r tests/kubernetes/checkov-requirements.txt
	touch $(CHECKOV_STAMP)

checkov: $(CHECKOV_STAMP)

test: $(STAMP) $(BARMAN_STAMP) $(CHECKOV_STAMP)
	$(BIN)/pytest tests/unit tests/integration tests/monitoring tests/kubernetes

# The same suite on the newest releases pyproject.toml's ranges admit (a virtualenv of its own,
# upgraded on every run).
test-newest: $(BARMAN_STAMP)
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q --upgrade pip
	$(NEWEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(NEWEST)/bin/python -c "import sqlalchemy, alembic, prometheus_client, apscheduler, psycopg2; \
		print('newest:', 'SQLAlchemy', sqlalchemy.__version__, '| alembic', alembic.__version__, \
		'| psycopg2', psycopg2.__version__.split()[0])"
	$(NEWEST)/bin/pytest tests/unit tests/integration tests/monitoring $(NEWEST_SKIP:%=--ignore=%)

# Left out of the newest run: long fault and shipping scenarios whose engine is Barman, pinned in
# its own virtualenv for both runs. The rest of the PITR and off-host tests run on both ends.
NEWEST_SKIP := $(addprefix tests/integration/,test_pitr_faults.py test_pitr_going_back.py \
	test_pitr_keep.py test_pitr_dashboard.py test_offsite_ship.py test_offsite_serve.py)

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP) $(BARMAN_STAMP)
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
bench: $(STAMP) $(BARMAN_STAMP)
	$(BIN)/pytest -s tests/benchmarks

# --- The stack (docker-compose.yml); the logic lives in docker/stack.py --------------------------
# make up | down | ps | logs [SERVICE=ops] | backup | backups [FROM=offsite] | verify [ID=...] [DRILL=1]
# make restore ID=... [TARGET_DB=name] [FORCE=1] [REPLACE_LIVE=1] [ALLOW_POSTGRES_DB=1] [FROM=offsite]
# make psql | demo (WORKLOAD_MODE=saturate) | demo-stop | e2e
# Each runs in the stack's containers (the sidecar for backups); `ops` on the host is for host
# installs.
# make recover [TIME='2026-11-28 14:05:00+00'] [FROM=offsite]   # point-in-time recovery of the
#   live database; FROM=offsite restores from the object store alone (the host's backups gone)
STACK := $(PYTHON) docker/stack.py
# A make variable as one shell word, whatever quotes it holds.
quote = '$(subst ','\'',$(1))'

.PHONY: up down ps logs backup backups verify restore psql demo demo-stop recover

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
	@$(STACK) backups $(if $(ALL),--all) $(if $(FROM),--from=$(call quote,$(FROM)))

verify:
	@$(STACK) verify $(if $(DRILL),--drill) $(if $(ID),-- $(call quote,$(ID)))

restore:
	@test -n $(call quote,$(ID)) || { echo "usage: make restore ID=<backup id> [TARGET_DB=name] [FORCE=1] [REPLACE_LIVE=1] [ALLOW_POSTGRES_DB=1] [FROM=offsite] (make backups [FROM=offsite] lists the ids)" >&2; exit 2; }
	@$(STACK) restore $(if $(FROM),--from=$(call quote,$(FROM))) $(if $(TARGET_DB),--target-db=$(call quote,$(TARGET_DB))) $(if $(FORCE),--force) $(if $(REPLACE_LIVE),--replace-live) $(if $(ALLOW_POSTGRES_DB),--allow-postgres-db) -- $(call quote,$(ID))

psql:
	@$(STACK) psql

recover:
	@$(STACK) recover $(if $(TIME),--time $(call quote,$(TIME))) $(if $(FROM),--from $(call quote,$(FROM)))

demo:
	@$(STACK) demo

demo-stop:
	@$(STACK) demo-stop

# End to end on real containers: builds the image, runs the stack under its own project name and
# ports, and removes it afterwards. Needs a Docker engine. Bounded: after 30 minutes pytest is
# interrupted, which still tears the stack down.
e2e: $(STAMP)
	DBOPS_E2E=1 timeout --signal=INT --kill-after=120 1800 $(BIN)/pytest -p no:cacheprovider tests/e2e
