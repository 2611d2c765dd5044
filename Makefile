# Two commands do all the set-up: `make demo` and `make test`. Both create (or
# reuse) a virtual environment in .venv and install what they need into it.
#
# Where the system Python already has a torch that sees a GPU, the venv is
# built on top of it (--system-site-packages) so that torch is kept as is.
# Elsewhere torch $(CPU_TORCH) is installed from pip's configured index. The pin
# picks a version, not a build: the public index (PyPI) serves the CUDA build
# for Linux, with NVIDIA's runtime wheels. For the CPU build, name PyTorch's
# CPU wheel index:
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Empty (the default), torch comes from the configured index, which is right
# where that index already serves a CPU build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.selopt-installed
CPU_TORCH ?= torch==2.13.*
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
HAS_GPU_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 && echo 1)

# The oldest Triton selopt supports (pyproject.toml's lower bound), in a venv of its own.
OLDEST_TRITON ?= triton==3.6.*
OLDEST_VENV   ?= .venv-oldest-triton
OLDEST_STAMP  := $(OLDEST_VENV)/.selopt-installed

.PHONY: demo test compile-check-oldest bench clean

$(STAMP): pyproject.toml Makefile
ifeq ($(HAS_GPU_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e ".[triton,test,demo,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.forgetting

# Without a GPU the kernels are checked on CPU by Triton's interpreter and the
# GPU-only tests skip; with one, the kernels are compiled and run for real.
test: $(STAMP)
	TRITON_INTERPRET=$(if $(HAS_GPU_TORCH),0,1) $(PY) -m pytest -q --doctest-modules selopt tests

# Every kernel compiled for real GPUs (no GPU needed) on the oldest supported Triton: every
# configuration for sm_80/sm_90, the short list for AMD's gfx942/gfx90a (about 20 s each); and the
# static report's spill and 128-bit check for sm_90. Not for gfx942: Triton 3.6's AMD backend streams
# the tensors in 32-bit accesses (bench/NOTES.md §6, AMD Instinct). `make test` does all on the newest.
$(OLDEST_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(CPU_TORCH)"
	$(OLDEST_VENV)/bin/python -m pip install -q "$(OLDEST_TRITON)" numpy
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(OLDEST_STAMP)

compile-check-oldest: $(OLDEST_STAMP)
	env -u TRITON_INTERPRET $(OLDEST_VENV)/bin/python -m selopt.kernels.compile_check --arch 80 90 \
		--quick-arch gfx942 gfx90a --jobs 2
	env -u TRITON_INTERPRET $(OLDEST_VENV)/bin/python -m bench.static --arch 90 --quick --check --out ""

bench: $(STAMP)
	$(PY) -m bench.speed

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache .benchmarks
