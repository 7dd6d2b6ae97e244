# Quick start: `make up` runs the whole pipeline locally; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: up test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TSTAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

up: $(STAMP) .tools/kafka.fetched
	$(BIN)/mailmeta up $(ARGS)

test: $(TSTAMP) .tools/usr/sbin/smtp-source .tools/usr/sbin/nginx .tools/kafka.fetched .tools/deploy-tools.fetched
	tests/tools/browser.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: every test that starts no broker, cluster, Postfix, `mailmeta up` or stage
# process (tests/conftest.py marks those `heavy`).
test-fast: $(TSTAMP)
	$(BIN)/python -m pytest -m 'not heavy' $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

bench: $(TSTAMP) .tools/usr/sbin/smtp-source .tools/kafka.fetched
	$(BIN)/python bench/smtp_ingest.py

.tools/usr/sbin/smtp-source .tools/usr/sbin/nginx: tests/tools/fetch.sh
	tests/tools/fetch.sh .tools

# Apache Kafka (KRaft) jars for tests and benchmarks; refetched when the pinned version changes.
.tools/kafka.fetched: tests/tools/kafka-pom.xml tests/tools/fetch_kafka.sh
	tests/tools/fetch_kafka.sh .tools
	touch $@

# helm, kubeconform, promtool and the Compose schema for tests/test_deploy.py (Go module proxy).
.tools/deploy-tools.fetched: tests/tools/fetch_deploy_tools.sh
	tests/tools/fetch_deploy_tools.sh .tools
	touch $@

format: $(TSTAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .tools .mailmeta .pytest_cache .mypy_cache .ruff_cache
