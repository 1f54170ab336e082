# pae_fast: two commands on a fresh machine — `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The dev install is pinned (torch 2.14.1 + torchvision 0.29.1 install from local disk here); the package
# metadata only asks for torch>=2.5 so GPU users keep their own build.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Without a CUDA device the Triton kernels run under the interpreter (must be set before triton is imported).
KERNEL_ENV := $(shell [ -e /dev/nvidia0 ] || echo TRITON_INTERPRET=1)
JOBS ?= 2
# The demo's models are tiny: one intra-op thread per process (two were up to 10x slower on a busy CPU here).
DEMO_THREADS ?= 1

.PHONY: install test test-all demo bench first-light lint clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev,dali,hf]"
	touch $@

install: $(VENV)/.installed

test: install
	$(KERNEL_ENV) $(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

test-all: install
	$(KERNEL_ENV) $(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not benchmark" tests

demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(KERNEL_ENV) $(PY) -m pae_fast demo --config configs/demo_cpu.yaml

bench: install
	$(KERNEL_ENV) $(PY) benchmarks/run_all.py

# Run first on any new GPU (benchmarks/README.md § GPU first light): the machine's own python3 on the bare checkout,
# no venv, no install, nothing downloaded; <= 6 min on one H100; the report goes to benchmarks/results/first_light/.
first-light:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_first_light.py --out benchmarks/results/first_light

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
