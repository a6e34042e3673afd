# distinfer: install, regenerate the protocol, test, benchmark, lint.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU wheel: an unpinned torch resolves to a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install proto test chaos bench lint run-sample clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'

proto:
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--mypy_out=proto --mypy_grpc_out=proto proto/distinfer/v1/*.proto

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The chaos suite with many trials (CI runs one trial of each kind inside make test).
chaos: install
	HF_HUB_OFFLINE=1 DISTINFER_CHAOS_TRIALS=$${TRIALS:-10} $(BIN)/python -m pytest -q -s tests/integration/test_chaos.py

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run --out bench-report $(BENCH_ARGS)

lint:
	$(BIN)/ruff check coordinator worker client common tests benchmarks
	$(BIN)/ruff format --check coordinator worker client common tests benchmarks

run-sample: install
	HF_HUB_OFFLINE=1 $(BIN)/distinfer run --input examples/sample.jsonl --output sample-embeddings.jsonl

clean:
	rm -rf $(VENV) build *.egg-info
