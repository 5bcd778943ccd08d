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
	# The torch pin again on this line: without it pip may replace torch with transformers' choice.
	$(BIN)/pip install --quiet numpy pybind11 "scikit-build-core>=0.10" ninja tqdm safetensors pytest scikit-learn matplotlib "transformers==5.23.0" "$(TORCH_SPEC)"
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

# make bench-peers: torchfluence against pyDVL, kronfluence and pytorch-influence-functions,
# each pinned, in a venv of its own (.bench-venv/, never .venv/) so the peers' dependencies
# cannot change the test environment. Pass options with BENCH_ARGS, e.g.
#   make bench-peers BENCH_ARGS="--quick"      make bench-peers BENCH_ARGS="--only ekfac-100k"
# torch is pinned on the same pip command line as the peers: kronfluence requires torchvision,
# and only with the pin does pip pick the torchvision built for this torch instead of
# upgrading torch (pyDVL also pins numpy<2 here). The extension is built in its own build
# folder so that this venv and .venv/ never rebuild each other's CMake tree.
BENCH_VENV := .bench-venv
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_TORCH_SPEC ?= torch==2.13.0
BENCH_PEERS := "pydvl[influence]==0.10.0" "kronfluence==1.0.1" "pytorch-influence-functions==0.1.1" "transformers==5.23.0"
BENCH_ARGS ?=

.PHONY: bench-peers

# $(call require_pinned_torch,PYTHON,WHO): fails when the packages WHO brought replaced BENCH_TORCH_SPEC's torch.
require_pinned_torch = $(1) -c "import sys, torch; v = torch.__version__.split('+')[0]; \
	sys.exit(None if '$(BENCH_TORCH_SPEC)' == 'torch==' + v else '$(2) replaced the pinned torch: got ' + torch.__version__)"

$(BENCH_BIN)/python:
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_VENV)/.deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC))): | $(BENCH_BIN)/python
	$(BENCH_BIN)/pip install --quiet "$(BENCH_TORCH_SPEC)" $(BENCH_PEERS) numpy scikit-learn tqdm \
		pybind11 "scikit-build-core>=0.10" ninja
	$(call require_pinned_torch,$(BENCH_BIN)/python,peers)
	touch $@

$(BENCH_VENV)/.torchfluence-installed: $(BENCH_VENV)/.deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC))) $(SOURCES)
	$(BENCH_BIN)/pip install --quiet --no-build-isolation --no-deps -C "build-dir=build/bench-{wheel_tag}" -e .
	$(BENCH_BIN)/python -c "import torchfluence as t; print('torchfluence', t.__version__, t.build_info())"
	touch $@

bench-peers: $(BENCH_VENV)/.torchfluence-installed
	$(BENCH_BIN)/python benchmarks/bench_peers.py $(BENCH_ARGS)

# make bench-lds: the linear datamodeling score of every torchfluence solver and of kronfluence,
# TRAK (traker) and dattri on the same retrained digits MLP and CNN (benchmarks/bench_lds.py), in
# .bench-venv/ next to the bench-peers packages. traker and dattri are pinned on one pip line with
# torch and the other peers, so that none of them can replace a pinned package; the torch pin is
# checked after. The retrainings are checkpointed in build/lds/ (reused by later runs); the
# table goes to bench_out/lds.md. Pass other options with BENCH_LDS_ARGS, e.g.
#   make bench-lds BENCH_LDS_ARGS="--workloads mlp:100 --only EK-FAC,TRAK"
BENCH_LDS_PEERS := "traker==0.3.2" "dattri==0.3.0"
BENCH_LDS_STAMP := $(BENCH_VENV)/.lds-deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC)))
BENCH_LDS_ARGS ?= --workloads mlp:1000,cnn:500
BENCH_LDS_OUT ?= bench_out/lds.md

.PHONY: bench-lds

$(BENCH_LDS_STAMP): $(BENCH_VENV)/.deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC)))
	$(BENCH_BIN)/pip install --quiet "$(BENCH_TORCH_SPEC)" $(BENCH_PEERS) $(BENCH_LDS_PEERS)
	$(call require_pinned_torch,$(BENCH_BIN)/python,traker or dattri)
	$(BENCH_BIN)/python -c "import trak, dattri, kronfluence"
	touch $@

bench-lds: $(BENCH_VENV)/.torchfluence-installed $(BENCH_LDS_STAMP)
	mkdir -p bench_out build/lds
	OMP_NUM_THREADS=1 $(BENCH_BIN)/python benchmarks/bench_lds.py --checkpoint-dir build/lds \
		--markdown $(BENCH_LDS_OUT) $(BENCH_LDS_ARGS)

# make pydvl-suite PYDVL_SRC=/path/to/pyDVL: pyDVL's own influence tests (from a checkout of
# pyDVL's repository at tag v0.10.0; its files are copied to build/pydvl-suite/ and never kept
# here) run against torchfluence.pydvl after tools/swap_pydvl_imports.py swaps the imports of
# the influence classes, enums, preconditioners and exceptions; oracles and utilities stay on
# pyDVL 0.10.0 from the registry (pyDVL's conftest needs pytest's cache plugin: its cache stays in the
# scratch folder). Own venv (.pydvl-venv/): pyDVL pins numpy<2 and its tests
# pin pytest 7.4.2 and pytest-cases 3.8. Select cases with PYDVL_ARGS, e.g. PYDVL_ARGS="-k cg".
PYDVL_VENV := .pydvl-venv
PYDVL_BIN := $(PYDVL_VENV)/bin
PYDVL_SRC ?=
PYDVL_ARGS ?=
PYDVL_TESTS := tests/influence/torch/test_influence_model.py tests/influence/test_influence_calculator.py \
	tests/influence/torch/test_pre_conditioner.py
PYDVL_SCRATCH := build/pydvl-suite

.PHONY: pydvl-suite

$(PYDVL_BIN)/python:
	$(PYTHON) -m venv $(PYDVL_VENV)

$(PYDVL_VENV)/.deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC))): | $(PYDVL_BIN)/python
	$(PYDVL_BIN)/pip install --quiet "$(BENCH_TORCH_SPEC)" "pydvl[influence]==0.10.0" "numpy<2" \
		"pytest==7.4.2" "pytest-cases~=3.8" pytest-mock pytest-xdist scikit-learn scipy tqdm safetensors \
		pybind11 "scikit-build-core>=0.10" ninja
	$(call require_pinned_torch,$(PYDVL_BIN)/python,pyDVL)
	touch $@

$(PYDVL_VENV)/.torchfluence-installed: $(PYDVL_VENV)/.deps-$(subst =,_,$(subst /,_,$(BENCH_TORCH_SPEC))) $(SOURCES)
	$(PYDVL_BIN)/pip install --quiet --no-build-isolation --no-deps -C "build-dir=build/pydvl-{wheel_tag}" -e .
	touch $@

pydvl-suite: $(PYDVL_VENV)/.torchfluence-installed
	@test -n "$(PYDVL_SRC)" -a -d "$(PYDVL_SRC)/tests/influence" || \
		{ echo "PYDVL_SRC must name a checkout of pyDVL (tag v0.10.0) with tests/influence/"; exit 2; }
	rm -rf $(PYDVL_SCRATCH) && mkdir -p $(PYDVL_SCRATCH)/tests/influence/torch
	cd $(PYDVL_SRC) && cp tests/__init__.py tests/conftest.py tests/cache.py $(CURDIR)/$(PYDVL_SCRATCH)/tests/ && \
		cp tests/influence/__init__.py tests/influence/conftest.py $(CURDIR)/$(PYDVL_SCRATCH)/tests/influence/ && \
		cp tests/influence/torch/__init__.py tests/influence/torch/conftest.py tests/influence/torch/test_util.py \
			$(CURDIR)/$(PYDVL_SCRATCH)/tests/influence/torch/ && \
		for f in $(PYDVL_TESTS); do if [ -f $$f ]; then cp $$f $(CURDIR)/$(PYDVL_SCRATCH)/$$f; fi; done
	printf '[pytest]\nmarkers =\n    torch: uses PyTorch\n' > $(PYDVL_SCRATCH)/pytest.ini
	$(PYDVL_BIN)/python tools/swap_pydvl_imports.py $$(find $(PYDVL_SCRATCH)/tests -name '*.py')
	cd $(PYDVL_SCRATCH) && $(CURDIR)/$(PYDVL_BIN)/python -m pytest -q $(PYDVL_ARGS) \
		$$(for f in $(PYDVL_TESTS); do if [ -f $$f ]; then echo $$f; fi; done)

# make gpu-peer-wheels: kronfluence 1.0.1 and einconv as wheels in .whl/, for a GPU machine
# without network access. benchmarks/gpu_suite.sh installs whatever .whl/ holds (carry it along).
.PHONY: gpu-peer-wheels
gpu-peer-wheels:
	$(PYTHON) -m pip download --quiet --no-deps -d .whl "kronfluence==1.0.1" "einconv==0.1.0"
	ls -l .whl
