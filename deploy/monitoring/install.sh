#!/usr/bin/env bash
# Prometheus and promtool from Debian's `prometheus` package, for eddy's own monitoring server and the
# rule tests. Idempotent: does nothing when both are on PATH. eddy starts its Prometheus on a free
# loopback port itself, so the package's system service is stopped and disabled after installing.
set -euo pipefail
step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  step "prometheus present ($(prometheus --version 2>&1 | head -1 | cut -d' ' -f3))"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  fail "prometheus/promtool are missing: install them (sudo apt-get install --no-install-recommends prometheus) and run make setup again"
fi
step "installing prometheus and promtool (apt)"
# No recommends: they would bring prometheus-node-exporter, one more system service on :9100.
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
install 2>/dev/null || { apt-get update -q >/dev/null && install; }
# The package starts (and enables) a system service on :9090 scraping itself; eddy runs its own.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
else
  service prometheus stop >/dev/null 2>&1 || true
  update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null || fail "the prometheus package installed no promtool"
step "prometheus $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3) installed; its system service is stopped"
