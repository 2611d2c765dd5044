# Two commands do all the set-up: `make demo` and `make test`. Both create (or
# reuse) a virtual environment in .venv and install what they need into it.
#
# Where the system Python already has a torch that sees a GPU, the venv is
# built on top of it (--system-site-packages) so that torch is kept as is.
# Elsewhere the CPU build is pinned: an unpinned `torch` would pull the newest
# CUDA build, several GB that a CPU machine cannot use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.selopt-installed
CPU_TORCH ?= torch==2.13.*
HAS_GPU_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 && echo 1)

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
ifeq ($(HAS_GPU_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e ".[triton,test,demo,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.forgetting

# Without a GPU the kernels are checked on CPU by Triton's interpreter and the
# GPU-only tests skip; with one, the kernels are compiled and run for real.
test: $(STAMP)
	TRITON_INTERPRET=$(if $(HAS_GPU_TORCH),0,1) $(PY) -m pytest -q --doctest-modules selopt tests

bench: $(STAMP)
	$(PY) -m bench.speed

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
