# Set-up, tests, demo and benchmarks. Every target creates .venv/ when needed.
#   make demo      set up and run the main job
#   make test      set up and run the test suite
#   make install   set up only (.venv with torch, build deps, editable build)
#   make bench     set up and run the benchmarks
# Choose another torch with TORCH_SPEC, e.g. make test TORCH_SPEC=torch==2.14.1
# CUDA kernels: TORCHFLUENCE_CUDA=AUTO (default: build when nvcc is found), ON or OFF.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCHFLUENCE_CUDA ?= AUTO
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.torchfluence-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
export TORCHFLUENCE_CUDA

.PHONY: install test demo bench wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps-$(subst =,_,$(subst /,_,$(TORCH_SPEC))): | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet numpy pybind11 "scikit-build-core>=0.10" ninja tqdm pytest scikit-learn matplotlib
	touch $@

$(STAMP): $(VENV)/.deps-$(subst =,_,$(subst /,_,$(TORCH_SPEC))) $(SOURCES)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import torchfluence as t; print('torchfluence', t.__version__, t.build_info())"
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest tests -q

demo: install
	$(BIN)/torchfluence demo

bench: install
	$(BIN)/python benchmarks/bench_influence_block.py

wheel: install
	$(BIN)/pip wheel --quiet --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist $(VENV)
