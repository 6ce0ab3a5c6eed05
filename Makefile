# rxledger developer tasks. `make` or `make help` lists them.
#
# Needs python3 (>= 3.11), make, and Go (to build FerretDB, the MongoDB-protocol server used
# for development and tests, the tlog interoperability client under tests/interop/, and Shopify's
# toxiproxy for tests/test_faults.py, kept as var/bin/toxiproxy-server). The
# tests also drive Debian's chromium; `make browser` installs it (as root), and run the docs'
# marked examples with bash and curl (tests/test_docs.py). Set MONGODB_URI to
# use another server (e.g. a real MongoDB) instead: then FerretDB is neither built nor started.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed
DB_PORT ?= 27017
DB_DIR  ?= var/db
HOST    ?= 127.0.0.1
PORT    ?= 8000

DEVDB := $(PYTHON) scripts/devdb.py --port $(DB_PORT) --data-dir $(DB_DIR)

.PHONY: help venv ferretdb browser db db-stop run lint schema typecheck test bench clean

help: ## list the targets
	@echo "usage: make TARGET   (set MONGODB_URI to use your own MongoDB instead of FerretDB)"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo
	@echo "variables: DB_PORT=$(DB_PORT) DB_DIR=$(DB_DIR) HOST=$(HOST) PORT=$(PORT) PYTHON=$(PYTHON)"

venv: $(STAMP) ## create .venv and install the project with its dev extras

$(STAMP): pyproject.toml
	@if [ ! -x $(VENV)/bin/python ]; then \
	  echo "creating $(VENV) with $$($(PYTHON) --version 2>&1)"; \
	  $(PYTHON) -m venv $(VENV) || { \
	    echo "error: '$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; \
	    rm -rf $(VENV); exit 1; }; \
	fi
	@echo "installing rxledger[dev] into $(VENV)"
	@$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

ferretdb: ## build patched FerretDB into var/bin (again if the patch changed; skipped if MONGODB_URI is set)
	@if [ -n "$$MONGODB_URI" ]; then \
	  echo "MONGODB_URI is set; not installing FerretDB"; \
	else \
	  bash scripts/install-ferretdb.sh >/dev/null; \
	fi

browser: ## install Debian's chromium and chromium-driver for the /audit page test (needs root)
	@bash scripts/install-chromium.sh

db: ## start the development server (FerretDB on DB_PORT, data in DB_DIR), detached
	@if [ -n "$$MONGODB_URI" ]; then \
	  echo "MONGODB_URI is set; not starting a server"; \
	else \
	  $(DEVDB) start; \
	fi

db-stop: ## stop the development server
	@$(DEVDB) stop

run: venv db ## serve the GraphQL gateway on HOST:PORT (MONGODB_URI defaults to the dev server)
	MONGODB_URI="$${MONGODB_URI:-mongodb://127.0.0.1:$(DB_PORT)/}" \
	RXLEDGER_MODE="$${RXLEDGER_MODE:-development}" \
	  $(VENV)/bin/rxledger serve --host $(HOST) --port $(PORT)

lint: venv ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

schema: venv ## regenerate schema.graphql (the SDL) from the code
	$(VENV)/bin/rxledger schema > schema.graphql

typecheck: venv ## mypy (strict) on anchoring/, app/ and schema/
	$(VENV)/bin/mypy anchoring app schema

# FerretDB is built first so that its (one-time, minutes-long) build shows its progress instead of
# happening silently inside pytest. Tests start and stop their own server on a free port, or use
# MONGODB_URI when it is set.
test: venv ferretdb browser ## lint, typecheck, then the test suite
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory typecheck
	$(VENV)/bin/python -m pytest

bench: venv ferretdb ## run the benchmarks (bench/*.py; each has --help); minutes, 10^5 rows
	$(VENV)/bin/python bench/ledger.py
	$(VENV)/bin/python bench/graphql.py
	$(VENV)/bin/python bench/hospital.py --sizes 1000,100000
	$(VENV)/bin/python bench/proofs.py --sizes 10000,1000000
	$(VENV)/bin/python bench/subscriptions.py --rate 1
	$(VENV)/bin/python bench/tiles.py
	$(VENV)/bin/python bench/ferretdb_index.py

clean: ## stop the dev server, remove .venv, var/ (FerretDB binary, data) and caches
	-@$(DEVDB) stop
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
