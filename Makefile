# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/digits
PIPELINE ?= pipelines/digits.yaml

.PHONY: demo test setup clean benchmark-sims

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sims run --config $(PIPELINE) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

benchmark-sims: $(STAMP)
	$(BIN)/python benchmarks/sims_effect.py --config $(PIPELINE) --seeds 0 1 2

clean:
	rm -rf out
