# The two commands a fresh machine needs: `make demo` and `make test` (each sets itself up first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= models/tiny

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench gpu-check install models clean

demo: install models
	$(PY) -m ray_jobs.run --config workflows/demo.yaml $(ARGS)

test: install
	$(VENV)/bin/ruff check coral ray_jobs tests benchmarks
	$(VENV)/bin/ruff format --check coral ray_jobs tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install models
	$(PY) -m benchmarks.run_all

# The GPU figures at real sizes, random weights, no download: full size with a CUDA GPU (at most 8 min on
# one H100/H200; results in benchmarks/results/gpu_*.json), else the tiny size on the CPU (a temp dir).
# faiss-gpu and vLLM parts need `pip install .[gpu,vllm]`; without them they are recorded as skipped.
gpu-check: install
	$(PY) -m benchmarks.gpu_check

install: $(VENV)/.installed

# torch==2.13.0 comes first in requirements.txt so pip never resolves a CUDA build for CPU machines.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

models: $(MODELS)/.built

$(MODELS)/.built: $(VENV)/.installed coral/testing/tiny.py coral/annotate/prompts.py coral/annotate/data/demonstrations.jsonl
	$(PY) -m ray_jobs.build_tiny_models --out $(MODELS) --force
	touch $@

clean:
	rm -rf runs $(MODELS)
