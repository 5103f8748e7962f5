# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_ARGS ?=

.PHONY: setup system-deps demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/nodeps.txt requirements/test.txt
	$(PY) -m venv $(VENV)
	# torch first, pinned: a looser pin lets pip fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[dev]' -r requirements/test.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	touch $(STAMP)

# The README's first command (kronlink/cli/demo.py): build the ICD-10-CM and HPO tasks (1,000
# source mentions each), start the service and worker on the embedded default under $(DEMO_DIR)/data,
# learn ICD-10-CM (version 1) and then HPO (a KFC update) through the HTTP API, and print the
# dashboard URL and a curl for /v1/link; the service keeps running until Ctrl-C. Safe to
# re-run. DEMO_ARGS=--full: the whole tasks (a GPU is advised); --exit: stop when done.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/kronlink demo --dir $(DEMO_DIR) $(DEMO_ARGS)

# System packages some tests need, from Debian: Chromium for the dashboard's browser test
# (Playwright drives it; its own browser download cannot work here), docker-compose,
# whose `config` validates docker-compose.yml, and podman with runc and debootstrap,
# with which tests/compose builds the images and runs the compose stack (no image
# registry is reachable: the base image comes from debootstrap). apt runs only when one
# is missing, and only as root; otherwise those tests skip (fail under CI=true).
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/docker-compose /usr/bin/podman /usr/sbin/debootstrap /usr/sbin/runc
system-deps:
	@missing=0; for f in $(SYSTEM_TOOLS); do [ -x $$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends chromium chromium-driver fonts-dejavu-core docker-compose \
			podman runc debootstrap containernetworking-plugins uidmap; \
	else echo "make system-deps: $(SYSTEM_TOOLS) not all there and no root apt-get: their tests will skip" >&2; fi

test: setup system-deps
	HF_HUB_OFFLINE=1 $(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
