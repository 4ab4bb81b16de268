# eddy: `make demo` and `make test` are the two commands; both run `make setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit demo bench bench-peers peers lint lock clean dashboards k8s-check image k8s-play

setup:
	@bash deploy/setup.sh

# The whole suite (what CI runs), with the 25 slowest tests listed at the end.
test: setup k8s-check
	@$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

# Unit tests only: no service, under a minute.
unit: setup
	@$(PY) -m pytest tests/unit -m "not integration and not e2e" $(PYTEST_ARGS)

demo: setup
	@$(VENV)/bin/eddy demo

bench: setup
	@$(VENV)/bin/eddy bench

# The native feature engine against Quix Streams and Bytewax on one backlog (docs/benchmark.md, "Peers").
bench-peers: setup
	@$(VENV)/bin/eddy bench --peers --out bench-peers.json

# Only the peers' virtualenv, .venv-peers (make setup makes it too).
peers:
	@bash deploy/setup.sh peers

lint: setup
	@$(VENV)/bin/ruff check streams features models lakehouse deploy tests
	@$(VENV)/bin/mypy streams features models lakehouse deploy

# The Helm chart validated offline: helm lint/template per values profile, kubeconform -strict against
# the Kubernetes and operators' CRD schemas (fetched into .tools/), the chart's own tests.
k8s-check: setup
	@bash deploy/k8s/check.sh

# The eddy image with podman (from a Debian base made here), and the chart's stages played from it.
image: setup
	@bash deploy/image/build.sh

k8s-play: image
	@$(PY) -m deploy.k8s.play

# Regenerate deploy/monitoring/dashboards/*.json after changing deploy/monitoring/dashboards.py.
dashboards: setup
	@$(PY) -m deploy.monitoring.dashboards

# Re-resolve the pinned set after changing pyproject.toml's dependencies.
lock:
	@$(PY) -m pip install -q -e ".[dev]" && $(PY) -m pip freeze | grep -v -E '^(-e |eddy)' > constraints.txt.new \
	  && (sed -n '1,3p' constraints.txt; cat constraints.txt.new) > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt \
	  && rm -f constraints.txt.new

clean:
	@rm -rf .eddy .pytest_cache .ruff_cache .hypothesis
