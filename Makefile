# Camelot: the single entry point. `make` prints this help.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto)
GEN := $(PROTOS:.proto=_pb2.py)
ARGS ?=

help: ## show this help
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# pip's own lines, filtered to one per package as it comes (the install takes about a minute)
$(STAMP): pyproject.toml
	@echo "make: [1/3] creating the virtualenv $(VENV)"
	@$(PY) -m venv $(VENV)
	@echo "make: [2/3] upgrading pip"
	@$(BIN)/pip install -q --upgrade pip
	@echo "make: [3/3] installing camelot and its dependencies (about a minute, once)"
	@set -o pipefail; $(BIN)/pip install -e '.[dev]' 2>&1 | tee $(VENV)/install.log \
	  | awk '/^(Collecting|Successfully installed|ERROR)/ {print "  " substr($$0, 1, 100); fflush()}' \
	  || { echo "make: the install failed; pip's output is in $(VENV)/install.log"; exit 1; }
	@touch $@

venv: $(STAMP) ## create the virtualenv and install the project

protos/%_pb2.py: protos/%.proto $(STAMP)
	@echo "make: codegen $<"
	@PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
	  --mypy_out=quiet:. --mypy_grpc_out=quiet:. $<

codegen: $(GEN) ## generate the gRPC code from protos/

run: codegen ## start the local mesh on the best backend, send a burst, print the table
	$(BIN)/python -m services.cli run $(ARGS)

test: codegen ## run the test suite (no GPU, no Docker needed)
	$(BIN)/python -m pytest -q $(ARGS)

test-gpu: codegen ## run the gpu tests (on a machine with CUDA)
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

lint: codegen ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common contract shmbroker services scheduler loadgen

fmt: venv ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-transport: codegen ## one-hop cost, ref against host copy -> docs/results/transport.json
	$(BIN)/python -m shmbroker.bench $(ARGS)

bench-e2e: codegen ## end-to-end p50/p99, ref against wire -> docs/results/e2e.json
	$(BIN)/python -m loadgen.bench_e2e $(or $(ARGS),--launch)

bench-host: codegen ## host path: null stages' max rate at p99<=25ms, CPU-ms/query per process -> docs/results/host-path.json
	$(BIN)/python -m loadgen.bench_host $(ARGS)

faults: codegen ## kill -9 each process of a live mesh under load -> docs/results/faults.json
	$(BIN)/python -m loadgen.faults $(ARGS)

gpu-faults: codegen ## a fatal GPU fault under load, MPS and green: recovery -> docs/results/gpu-faults.json
	$(BIN)/python -m loadgen.gpu_faults $(or $(ARGS),--sharing mps --sharing green)

soak: codegen ## 10 minutes at 80% of the measured peak: RSS, leases -> docs/results/soak.json
	$(BIN)/python -m loadgen.soak --duration-s 600 $(ARGS)

load: codegen ## Locust headless against the mesh `camelot up` started (ARGS: --host to name another, -t)
	$(BIN)/locust -f loadgen/locustfile.py --headless -u 20 -r 5 -t 30s $(ARGS)

clean: ## remove generated code and caches
	rm -f protos/*_pb2*.py protos/*_pb2*.pyi
	rm -rf .pytest_cache .mypy_cache .ruff_cache

.PHONY: help venv codegen run test test-gpu lint fmt bench-transport bench-e2e bench-host faults gpu-faults soak load clean
