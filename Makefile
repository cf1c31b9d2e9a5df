# The two promises of the README:
#   make run   - set up a virtual environment and start the app on the shipped sample data
#   make test  - set up a virtual environment (+ test tools, headless chromium) and run the tests
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
PORT   ?= 8501
ADDRESS ?= 127.0.0.1

.PHONY: run test test-all lint bench setup setup-dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.app-installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt $(VENV)/.app-installed
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.app-installed
setup-dev: $(VENV)/.dev-installed

browser:
	@bash scripts/ensure_chromium.sh

run: setup
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.address $(ADDRESS)

test: setup-dev browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

test-all: setup-dev browser
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
