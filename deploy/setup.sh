#!/usr/bin/env bash
# `make setup`: the virtualenv with the pinned Python set, the JVM jars through Maven, redis-server.
# Idempotent: each step keeps a stamp of what it installed and is skipped when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# The peer engines of `eddy bench --peers` (Quix Streams, Bytewax) in a virtualenv of their own: quixstreams
# needs older confluent-kafka, pydantic and pydantic-settings than .venv pins. ~25 s the first time.
peers_venv() {
  [ -x .venv-peers/bin/python ] || { step "creating .venv-peers"; "$PY" -m venv .venv-peers; }
  local want; want=$(hash_of deploy/peers-requirements.txt)
  if [ "$(cat .venv-peers/.eddy-installed 2>/dev/null)" != "$want" ]; then
    step "installing the peer engines into .venv-peers (deploy/peers-requirements.txt)"
    .venv-peers/bin/python -m pip install -q -r deploy/peers-requirements.txt
    echo "$want" > .venv-peers/.eddy-installed
  else
    step "peer engines up to date"
  fi
}
if [ "${1:-}" = peers ]; then peers_venv; exit 0; fi

# 1. Python packages into .venv
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "Python >= 3.11 is needed (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11"
[ -x .venv/bin/python ] || { step "creating .venv"; "$PY" -m venv .venv; }
want=$(hash_of constraints.txt pyproject.toml)
if [ "$(cat .venv/.eddy-installed 2>/dev/null)" != "$want" ]; then
  step "installing Python packages (first time: torch, pyspark, flink, feast; several GB, minutes)"
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  .venv/bin/python -m pip install --progress-bar on -c constraints.txt -e ".[dev]"
  echo "$want" > .venv/.eddy-installed
else
  step "Python packages up to date"
fi

peers_venv

# 2. JVM jars (Kafka broker, Flink Kafka connector, Spark Kafka + Delta + S3A, the local object store) from Maven Central
command -v java >/dev/null || fail "Java 17+ is needed: apt-get install openjdk-17-jre-headless"
command -v mvn >/dev/null || fail "Maven is needed to fetch the pinned jars: apt-get install maven"
want=$(hash_of deploy/jvm/pom.xml deploy/jvm/*/pom.xml)
if [ "$(cat .jars/.eddy-installed 2>/dev/null)" != "$want" ]; then
  step "fetching jars with Maven into .jars/"
  rm -rf .jars
  mvn -q -B -f deploy/jvm/pom.xml dependency:copy-dependencies -Djars.dir="$ROOT/.jars"
  echo "$want" > .jars/.eddy-installed
else
  step "jars up to date"
fi

# 3. redis-server from the OS packages
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing redis-server (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; }
    # The package starts a system service on 6379; eddy runs its own, so stop that one.
    (service redis-server stop || systemctl stop redis-server) >/dev/null 2>&1 || true
  else
    fail "redis-server is missing: install it (sudo apt-get install redis-server) and run make setup again"
  fi
else
  step "redis-server present ($(redis-server --version | cut -d' ' -f3))"
fi
# kcat, to try the secure broker as people's own tools do (`kcat -F $(eddy credentials producer)`);
# optional: its test is skipped without it.
if ! command -v kcat >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing kcat (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null 2>&1; } \
      || step "kcat could not be installed: its test will be skipped"
  else
    step "kcat is missing (sudo apt-get install kcat): its test will be skipped"
  fi
fi
# 4. Prometheus + promtool (Debian's package) for the local monitoring and the rule tests; Grafana's
#    dashboard schema (npm) into .tools/ for the dashboards' tests
bash deploy/monitoring/install.sh
bash deploy/monitoring/schema.sh
step "ready: .venv/bin/eddy"
