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

.PHONY: test test-gpu bench bench-gpu demo venv clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	# triton: the CPU suite runs the Triton kernels in its interpreter (a CPU install of the
	# package itself does not need it: it is the [triton] extra; torch's CUDA wheels bring it)
	$(VPY) -m pip install -q triton==$(TRITON_VERSION) ninja numpy pytest pytest-benchmark hypothesis tqdm matplotlib setuptools wheel
	# the project itself, editable, without deps (never pulls another torch): the venv's python
	# imports lightning_ops (and lightning_ops.layers) from any directory
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The CPU suite; Triton kernels run through the interpreter (set before any kernel import).
test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider

# GPU lane: the device's own python3 (torch, triton preinstalled), no venv, no network.
test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q -p no:cacheprovider -m gpu

# Results go to benchmarks/runs/<date-time>/ (untracked); e.g. make bench BENCH_ARGS="--threads 1 --report"
bench: $(STAMP)
	$(VPY) -m benchmarks $(BENCH_ARGS)

# The curated GPU run: rows and plots saved into benchmarks/results/ to be committed.
bench-gpu:
	mkdir -p benchmarks/runs/gpu
	set -o pipefail; PYTHONPATH=. $(PYTHON) -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tee benchmarks/runs/gpu/gpu-tests.log
	PYTHONPATH=. $(PYTHON) -m benchmarks --gpu-suite --out benchmarks/runs/gpu --report --save $(BENCH_ARGS)

demo: $(STAMP)
	$(VPY) examples/mqar.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
