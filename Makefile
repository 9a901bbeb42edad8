# Every target creates .venv when missing and installs the project with its extras first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-kafka test test-faults bench bench-quick lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf ./demo-data
	$(BIN)/ledger --data-dir ./demo-data demo

# Runs the whole Kafka path against the bundled broker (Tansu, memory storage), never
# against the broker a shell may have configured (synthetic events would land there).
demo-kafka: $(STAMP)
	rm -rf ./demo-data-kafka
	env -u LEDGER_KAFKA_BOOTSTRAP $(BIN)/ledger --data-dir ./demo-data-kafka demo --via-kafka

test: $(STAMP)
	$(BIN)/python -m pytest

# The long fault-injection variants (kill -9 loops on 50k events, broker outages);
# -rP shows what the passing ones print (seeds, kill counts).
test-faults: $(STAMP)
	$(BIN)/python -m pytest -m long_faults -rP

bench: $(STAMP)
	$(BIN)/python bench/benchmark.py --sizes 100000,1000000 --out bench-results

bench-quick: $(STAMP)
	$(BIN)/python bench/benchmark.py --sizes 20000 --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy domain projections consumers cli.py bootstrap.py

clean:
	rm -rf $(VENV) ledger-data demo-data demo-data-kafka .pytest_cache .mypy_cache .ruff_cache
