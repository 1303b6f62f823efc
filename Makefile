# `make train` and `make test` set up everything they need on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train sft dpo grpo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The package alone (what training needs); reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# Plus the test extras: pytest, ruff, notebook runners, torch (CPU) and transformers.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The demo: train a small Llama on the standard library's source code, then print completions.
train: $(VENV)/.installed
	$(BIN)/nnxlm train --recipe recipes/demo.py

# The fine-tuning demo: LoRA on the demo model (make train first, which resumes or is done at once)
# to write the docstrings of standard-library functions.
sft: $(VENV)/.installed
	$(MAKE) train
	$(BIN)/nnxlm train --recipe recipes/sft.py

# The preference demo: DPO on the fine-tuning demo's model (make sft first, which resumes or is done).
dpo: $(VENV)/.installed
	$(MAKE) sft
	$(BIN)/nnxlm train --recipe recipes/dpo.py

# The reinforcement demo: a small model pretrained briefly on sums, then GRPO with exact-match rewards.
grpo: $(VENV)/.installed
	$(BIN)/nnxlm train --recipe recipes/grpo.py:sums
	$(BIN)/nnxlm train --recipe recipes/grpo.py

# Two pytest processes side by side, one a core: one process running the whole suite segfaulted
# near its end (after ~740 tests, in a different test each time) as the threads and programs of
# hundreds of trainers piled up in it, and many tests wait on subprocesses, compilers and timeouts,
# so two lanes finish well before one would. Lane A's output is printed when both are done.
LANE_A := tests/modules tests/sharding tests/serving
LANE_B := tests/convert tests/data tests/objectives tests/recipes tests/test_*.py
PYTEST_FLAGS ?=  # e.g. make test PYTEST_FLAGS=--durations=20 to see where the time goes
test: lint
	@log=$$(mktemp); \
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_FLAGS) $(LANE_A) > $$log 2>&1 & lane_a=$$!; \
	echo "lane B: $(LANE_B)"; \
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_FLAGS) $(LANE_B); status_b=$$?; \
	wait $$lane_a; status_a=$$?; \
	echo "lane A: $(LANE_A)"; cat $$log; rm -f $$log; \
	test $$status_a -eq 0 && test $$status_b -eq 0

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -p no:cacheprovider --collect-only tests > /dev/null  # every test module imports

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Plus the bench extra: torch (CPU) and transformers, the peer that bench/ runs beside nnxlm.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

# Every benchmark of bench/ (about 10 minutes on 2 cores): writes bench/results.md.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
