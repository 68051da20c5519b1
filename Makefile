# The two commands a fresh machine needs: `make demo` and `make test` (each sets itself up first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= models/tiny

# Where torch comes from: pip installs it alone, first, from this index (then the rest from the usual one;
# the pinned version is requirements.txt's torch== line). PyPI's Linux torch is the CUDA build and pulls
# about 20 nvidia-* wheels (GBs), so name the build you want:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     # Linux, CPU only
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # Linux + NVIDIA GPU (CUDA 12.8)
#   make install TORCH_INDEX_URL=https://pypi.org/simple                  # macOS (CPU / MPS)
# Empty (the default): pip's own configuration (pip config list: PIP_INDEX_URL, pip.conf, find-links),
# which on the CI machines offers the CPU wheel. pip keeps a torch that already meets the pin, so to
# change the build of an existing venv: rm -rf $(VENV), then make install TORCH_INDEX_URL=...
TORCH_INDEX_URL ?=
TORCH := $(shell grep -E '^torch==' requirements.txt)

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench gpu-check install install-dev models clean bytecode ds-ops

# Bytecode for the project's own modules, written once: where PYTHONDONTWRITEBYTECODE is set, every Ray
# worker process would otherwise compile what it imports of coral again (about half a second each).
# Seconds when nothing changed.
bytecode:
	$(PY) -m compileall -q coral ray_jobs benchmarks tests

# DeepSpeed on the CPU accelerator compiles its shared-memory collective op (g++) at the first
# deepspeed.initialize, 20-80 s that the first train stage would wait for: built here, once per venv
# (cached under ~/.cache/torch_extensions). Without a compiler the first train stage builds it, or fails.
ds-ops: $(VENV)/.ds-ops

$(VENV)/.ds-ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null || echo "DeepSpeed's CPU op not built here: the first train stage builds it"
	touch $@

demo: install models bytecode ds-ops
	$(VENV)/bin/coral run --config workflows/demo.yaml $(ARGS)

test: install-dev bytecode ds-ops
	$(VENV)/bin/ruff check coral ray_jobs tests benchmarks
	$(VENV)/bin/ruff format --check coral ray_jobs tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev models bytecode ds-ops
	$(PY) -m benchmarks.run_all

# The GPU figures at real sizes, random weights, no download: full size with a CUDA GPU (at most 8 min on
# one H100/H200; results in benchmarks/results/gpu_*.json), else the tiny size on the CPU (a temp dir).
# faiss-gpu and vLLM parts need `pip install .[gpu,vllm]`; without them they are recorded as skipped.
gpu-check: install-dev
	$(PY) -m benchmarks.gpu_check

# install: what the code needs to run (make demo): torch from TORCH_INDEX_URL, then requirements.txt (the
# pinned runtime set with faiss-cpu, pyproject.toml's `cpu` extra), then the project itself, editable
# (the `coral` command). install-dev: that plus the test and lint tools of requirements-dev.txt (make test,
# bench, gpu-check). A package install instead: pip install torch==... first, then pip install ".[cpu]"
# (or ".[gpu]"; never both: each provides the faiss module; ".[vllm]" adds Ray's vLLM).
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

models: $(MODELS)/.built

$(MODELS)/.built: $(VENV)/.installed coral/testing/tiny.py coral/annotate/prompts.py coral/annotate/data/demonstrations.jsonl
	$(VENV)/bin/coral build-tiny-models --out $(MODELS) --force
	touch $@

clean:
	rm -rf runs $(MODELS)
