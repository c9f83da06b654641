# The two commands of the README: `make serve` (main job) and `make test` (test suite).
# Everything else is set up on demand in .venv, so a fresh machine needs only python3 and make.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: serve test install tools promtool bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: an open requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train,test]"
	touch $(STAMP)

install: $(STAMP)

## Main job: train a default model if none exists, export it to a bundle, serve it on 127.0.0.1:8000.
serve: $(STAMP)
	$(BIN)/rewardserve up $(ARGS)

## Offline validation tools for the deployment tests (helm, kubernetes-validate, hadolint, checkov).
tools:
	bash deploy/tools.sh

## promtool (Debian package prometheus) for the metrics exposition test in tests/test_fuzz.py. Idempotent;
## where it cannot be installed, the test skips, and fails when CI is set.
promtool:
	@command -v promtool >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; } || echo "make promtool: could not install the Debian package prometheus" >&2

## Test suite (what .ci/run runs).
test: $(STAMP) tools promtool
	$(BIN)/python -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) models runs
