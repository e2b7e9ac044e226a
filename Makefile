# monolith-py — the two commands a newcomer needs are `make demo` and `make test`.
# Both run `make setup` first, which creates .venv in the repo and installs everything;
# it does nothing (in about a second) when the recorded inputs have not changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CPU recipe (see README "Install"): torch's CPU wheel and fbgemm-gpu-cpu first,
# torchrec without its dependencies (its metadata pulls the multi-GB CUDA fbgemm-gpu).
TORCH_PINS    := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
TORCHREC_PIN  := torchrec==1.8.0
SETUP_INPUTS  := pyproject.toml requirements/lock.txt Makefile
STAMP         := $(VENV)/.setup-stamp

.PHONY: setup test test-fast demo bench lint clean-venv

setup:
	@want="$$(cat $(SETUP_INPUTS) | sha256sum | cut -c1-16)"; \
	if [ -x $(PY) ] && [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$want" ]; then \
		exit 0; \
	fi; \
	set -e; \
	echo "== setting up $(VENV) (first run takes a few minutes)"; \
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel; \
	$(PIP) install -q $(TORCH_PINS); \
	$(PIP) install -q --no-deps $(TORCHREC_PIN); \
	$(PIP) install -q -r requirements/lock.txt; \
	$(PIP) install -q --no-deps --no-build-isolation -e .; \
	$(PY) -c "import torch, torchrec, fbgemm_gpu, numba, kafka, zfec, grpc, fastapi; print('== setup ok: torch', torch.__version__)"; \
	echo "$$want" > $(STAMP)

test: setup
	$(PY) -m pytest -q

# Unit tier only (no broker, no subprocesses): the quick loop while coding.
test-fast: setup
	$(PY) -m pytest -q tests/unit

# The whole pipeline on this machine (broker, MovieLens replay, joiner, 2 PS shards, SMPs
# on 3 simulated hosts, trainer, serving) under the supervisor; a few minutes on 2 cores.
demo: setup
	$(VENV)/bin/monolith up

lint: setup
	$(PY) -m mypy

clean-venv:
	rm -rf $(VENV)
