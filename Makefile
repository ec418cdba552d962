SHELL := /bin/bash
# Two commands do all the set-up on a fresh machine:
#   make test    create .venv, install torch (CPU build here) + triton + deps, run the CPU suite
#   make bench   the main job: kernel throughput table (+ results/results.csv)
# On a GPU machine with its own python3 and no network (no venv): make test-gpu, make bench-gpu.

PYTHON        ?= python3
VENV          := .venv
VPY           := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>"
TORCH_PIP_ARGS ?=
BENCH_OUT     ?= benchmarks/results
STAMP         := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: test test-gpu bench bench-gpu demo venv clean peers

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	# triton: the CPU suite runs the Triton kernels in its interpreter (a CPU install of the
	# package itself does not need it: it is the [triton] extra; torch's CUDA wheels bring it)
	$(VPY) -m pip install -q triton==$(TRITON_VERSION) ninja numpy pytest pytest-benchmark hypothesis tqdm matplotlib setuptools wheel transformers accelerate
	# the project itself, editable, without deps (never pulls another torch): the venv's python
	# imports lightning_ops (and lightning_ops.layers) from any directory
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The CPU suite; Triton kernels run through the interpreter (set before any kernel import).
test: $(STAMP) sm90-env
	TRITON_INTERPRET=1 OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m pytest -q -p no:cacheprovider --durations=30

# GPU lane: the device's own python3 (torch, triton preinstalled), no venv, no network.
test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q -p no:cacheprovider -m gpu

# Results go to benchmarks/runs/<date-time>/ (untracked); e.g. make bench BENCH_ARGS="--threads 1 --report"
# OpenMP threads sleep when idle (PASSIVE): spinning threads stall on a busy small CPU
bench: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m benchmarks $(BENCH_ARGS)

# The curated GPU run: rows and plots saved into benchmarks/results/ to be committed.
bench-gpu:
	mkdir -p benchmarks/runs/gpu
	set -o pipefail; PYTHONPATH=. $(PYTHON) -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tee benchmarks/runs/gpu/gpu-tests.log
	PYTHONPATH=. $(PYTHON) -m benchmarks --gpu-suite --out benchmarks/runs/gpu --report --save $(BENCH_ARGS)

demo: $(STAMP)
	$(VPY) examples/mqar.py $(DEMO_ARGS)

# The peers' pure-PyTorch references for make bench (providers fla-naive, mamba-ref, conv1d-ref;
# optional: make test and make bench never need them). Into .venv, never another torch: fla's
# pure-Python wheels and mamba-ssm / causal-conv1d from their sdists without their CUDA
# extensions (FORCE_BUILD: no attempt to fetch a prebuilt CUDA wheel), all without deps.
# Then prints which references import. Undo:
#   .venv/bin/pip uninstall -y flash-linear-attention fla-core mamba-ssm causal-conv1d
FLA_VERSION    ?= 0.6.0
MAMBA_VERSION  ?= 2.3.2.post1
CONV1D_VERSION ?= 1.7.0
peers: $(STAMP)
	$(VPY) -m pip install -q --no-deps fla-core==$(FLA_VERSION) \
	  flash-linear-attention==$(FLA_VERSION) einops
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
	  CAUSAL_CONV1D_FORCE_BUILD=TRUE $(VPY) -m pip install -q --no-deps --no-build-isolation \
	  --no-binary mamba-ssm,causal-conv1d mamba-ssm==$(MAMBA_VERSION) \
	  causal-conv1d==$(CONV1D_VERSION)
	$(VPY) -c "from benchmarks import registry; print(*registry.peer_ref_status(), sep='\n')"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# --- GPU lease (issue 10) -------------------------------------------------------------------
# sm90-env: a compile-only env with the GPU machines' triton (3.6), used by the sm_90 AOT check
# (tests/core/test_sm90_resources.py); it reuses .venv's packages through a .pth file. If triton
# 3.6 cannot be installed here, the check runs under the CI's triton only (and says so).
VENV36        := .venv-triton36
TRITON36      ?= 3.6.0
GPU_WHEELS    := .gpu-wheels

.PHONY: sm90-env sm90-table gpu-wheels gpu-lane

sm90-env: $(STAMP)
	@test -f $(VENV36)/.ok || { $(VPY) -m venv $(VENV36) && \
	  $(VENV36)/bin/python -m pip install -q triton==$(TRITON36) && \
	  $(VPY) -c "import site; print(site.getsitepackages()[0])" > \
	    "$$($(VENV36)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_lightning_ops_main_venv.pth" && \
	  touch $(VENV36)/.ok; } || echo "sm90-env: triton $(TRITON36) could not be installed; the sm_90 check will run under triton $(TRITON_VERSION) only"

# the full sm_90 resource table (no time budget; commit benchmarks/results/sm90_resources.csv);
# rows whose kernel source or launch no longer exists are pruned
sm90-table: sm90-env
	$(VPY) tools/sm90_resources.py check --jobs 2 --python $(VPY) $(if $(wildcard $(VENV36)/.ok),--python $(VENV36)/bin/python)
	$(VPY) tools/sm90_resources.py prune --python $(VPY) $(if $(wildcard $(VENV36)/.ok),--python $(VENV36)/bin/python)

# fla-core + flash-linear-attention 0.6.0 (pure Python) for the lease: carry .gpu-wheels
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS) \
	  fla-core==0.6.0 flash-linear-attention==0.6.0

# one command for the lease, with the device's own python3: make gpu-lane OUT=<dir>
gpu-lane:
	@test -n "$(OUT)" || { echo "usage: make gpu-lane OUT=<dir>"; exit 2; }
	PYTHONPATH=. $(PYTHON) tools/gpu_lane.py --out $(OUT)
