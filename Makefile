# keyart — the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyart-installed
export KEYART_HOME ?= $(CURDIR)/var
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-spark test-models test-serving test-integration test-airflow test-e2e \
        lint mlflow-ui airflow-ui serve bench clean

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

serve: install
	$(BIN)/keyart serve

bench: install
	$(BIN)/keyart bench jobs && $(BIN)/keyart bench learning && $(BIN)/keyart bench serving && $(BIN)/keyart bench loop

MLFLOW_PORT ?= 5000
AIRFLOW_PORT ?= 8090

## MLflow UI on the local tracking store (experiment keyart, registered model keyart-artwork).
mlflow-ui: install
	@mkdir -p "$(KEYART_HOME)/mlflow/artifacts"
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(KEYART_HOME)/mlflow/mlflow.db" \
		--default-artifact-root "$(KEYART_HOME)/mlflow/artifacts" \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

## The Airflow UI on http://localhost:$(AIRFLOW_PORT) (AIRFLOW_HOME=$(KEYART_HOME)/airflow, SQLite, this repo's dags/).
airflow-ui: install
	AIRFLOW__API__PORT=$(AIRFLOW_PORT) $(BIN)/python -m keyart.demo.airflow_env run -- airflow standalone

clean:
	rm -rf var reports .pytest_cache
