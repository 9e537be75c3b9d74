# Every target builds .venv from the project's own files when it is missing or stale.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test faults interop bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/nvme-lm demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults tests/faults

# boots a Linux guest (../shared/tools/guest/) against `nvme-lm target serve`: needs root, QEMU and the image
interop: $(STAMP)
	$(BIN)/python -m pytest -q -m interop tests/interop

bench: $(STAMP)
	$(BIN)/python benchmarks/io.py
	$(BIN)/python benchmarks/noisy_neighbor.py
	$(BIN)/python benchmarks/lba_status.py
	$(BIN)/python benchmarks/migrate.py
	$(BIN)/python benchmarks/tcp.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
