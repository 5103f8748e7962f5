# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_LIMIT ?= 800

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/nodeps.txt requirements/test.txt
	$(PY) -m venv $(VENV)
	# torch first, pinned: a looser pin lets pip fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[dev]' -r requirements/test.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	touch $(STAMP)

# Build the two real tasks (10 candidates a query), train the transformer ranker on a
# seeded subset of ICD-10-CM's train split, evaluate it and BM25 on the whole test split.
# About 5 minutes on 2 CPU cores; DEMO_LIMIT= (empty) trains on the whole split.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/kronlink build-tasks --out $(DEMO_DIR)/tasks --tasks icd10cm,hpo --candidates 10
	HF_HUB_OFFLINE=1 $(BIN)/kronlink train --task $(DEMO_DIR)/tasks/icd10cm --model transformer \
		--out $(DEMO_DIR)/models/icd10cm $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT)) --epochs 2 \
		--lr 3e-4 --dev-limit 300
	HF_HUB_OFFLINE=1 $(BIN)/kronlink evaluate --model $(DEMO_DIR)/models/icd10cm \
		--task $(DEMO_DIR)/tasks/icd10cm --split test --baseline

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
