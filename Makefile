# The two commands of the README: `make serve` (main job) and `make test` (test suite).
# Everything else is set up on demand in .venv, so a fresh machine needs only python3 and make.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: serve test install tools promtool image-base image-test bench clean

$(STAMP): pyproject.toml client/pyproject.toml
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

## Container tools for tests/test_image.py: the Debian packages podman, runc, mmdebstrap and busybox-static
## (installed as root where missing, like promtool), then the stand-in base images of the Dockerfile
## (deploy/image/standin.sh: once per machine, podman's image store keeps them; the test machines reach no
## image registry). Idempotent; where it cannot, tests/test_image.py skips, and fails when CI is set.
IMAGE_PACKAGES := podman runc mmdebstrap busybox-static
image-base:
	@missing=""; for p in $(IMAGE_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } || \
		echo "make image-base: could not install the Debian packages$$missing" >&2
	@bash deploy/image/standin.sh || echo "make image-base: could not build the stand-in base images" >&2

## The serving image built from the Dockerfile and run as the Helm chart's pod spec says (tests/test_image.py;
## make test runs it too).
image-test: $(STAMP) tools image-base
	$(BIN)/python -m pytest -q tests/test_image.py $(ARGS)

## Test suite (what .ci/run runs).
test: $(STAMP) tools promtool image-base
	$(BIN)/python -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) models runs
