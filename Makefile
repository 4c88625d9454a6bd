# keyart — the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyart-installed
export KEYART_HOME ?= $(CURDIR)/var
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-spark test-models test-serving test-integration test-airflow test-e2e \
        lint mlflow-ui airflow-ui serve bench up down clean

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "keyart needs Java 17+ for Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

install: $(STAMP)

## The closed loop on embedded defaults (world, days of traffic, daily DAG, endpoint, report).
demo: install
	$(BIN)/keyart demo

## Every suite. Each suite also runs alone (targets below, or pytest -m MARK).
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit tests/models $(PYTEST_ARGS)
test-spark: install
	$(BIN)/pytest tests/jobs $(PYTEST_ARGS)
test-serving: install
	$(BIN)/pytest tests/serving $(PYTEST_ARGS)
test-integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)
test-airflow: install
	$(BIN)/pytest tests/airflow $(PYTEST_ARGS)
test-e2e: install
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check keyart jobs models serving bench demo dags tests

## The endpoint for local use. Its event-signing key is generated once into $(KEYART_HOME)/serving/event-secret
## (mode 600) unless KEYART_SERVE_EVENT_SECRET is set: rewards stay valid across restarts.
serve: install
	@mkdir -p "$(KEYART_HOME)/serving"
	@test -s "$(KEYART_HOME)/serving/event-secret" || (umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_hex(32))' > "$(KEYART_HOME)/serving/event-secret")
	KEYART_SERVE_EVENT_SECRET="$${KEYART_SERVE_EVENT_SECRET:-$$(cat "$(KEYART_HOME)/serving/event-secret")}" $(BIN)/keyart serve

bench: install
	$(BIN)/keyart bench jobs && $(BIN)/keyart bench learning && $(BIN)/keyart bench serving && $(BIN)/keyart bench loop

MLFLOW_PORT ?= 5000
AIRFLOW_PORT ?= 8090

## MLflow UI on the local tracking store (experiment keyart, registered model keyart-artwork).
mlflow-ui: install
	@mkdir -p "$(KEYART_HOME)/mlflow/artifacts"
	@# run from the store's folder: the server creates an empty ./mlruns in its working directory
	cd "$(KEYART_HOME)/mlflow" && $(abspath $(BIN))/mlflow ui --backend-store-uri "sqlite:///$(KEYART_HOME)/mlflow/mlflow.db" \
		--default-artifact-root keyart-artifacts:/ \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

## Airflow on http://127.0.0.1:$(AIRFLOW_PORT): API server, scheduler and DAG processor (LocalExecutor) on
## AIRFLOW_HOME=$(KEYART_HOME)/airflow with this repo's dags/. It prints the login (user admin, generated password).
airflow-ui: install
	AIRFLOW__API__PORT=$(AIRFLOW_PORT) $(BIN)/python -m keyart.demo.airflow_env up

## The production topology on this machine (infra/README.md): PostgreSQL databases, mlflow server, Spark
## standalone master + 2 workers, Airflow api-server/scheduler/dag-processor (LocalExecutor), 2 serving replicas
## behind HAProxy. Settings and generated secrets in $(KEYART_HOME)/stack/stack.env; prints every URL and login.
STACK_DIR ?= $(KEYART_HOME)/stack
STACK_ARGS ?=
up: install
	$(BIN)/python -m keyart.demo.stack up --state-dir "$(STACK_DIR)" $(STACK_ARGS)

## Stops exactly what `make up` started (pid files under $(STACK_DIR)/run); data stays (keyart stack down --purge drops it).
down:
	$(BIN)/python -m keyart.demo.stack down --state-dir "$(STACK_DIR)"

clean:
	rm -rf var reports .pytest_cache
