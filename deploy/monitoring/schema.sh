#!/usr/bin/env bash
# A JSON schema of Grafana's dashboard model (11.6), generated from npm @grafana/schema's TypeScript
# types with ts-json-schema-generator (both pinned by deploy/monitoring/schema/package-lock.json) into
# .tools/grafana-schema/dashboard.schema.json, which tests/monitoring/test_dashboards.py validates with.
# Idempotent: skipped when the schema was generated from the same pinned set. Without npm it warns and
# leaves no schema (the test then skips, or fails under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
DIR=.tools/grafana-schema
SRC=deploy/monitoring/schema
# The dashboard's types as the package ships them (dist/esm/raw/dashboard/x/dashboard_types.gen.d.ts).
TYPES=node_modules/@grafana/schema/dist/esm/raw/dashboard/x/dashboard_types.gen.d.ts

if ! command -v npm >/dev/null; then
  step "npm missing: the Grafana dashboard schema is not generated (apt-get install npm, then make setup)"
  exit 0
fi
want=$(cat "$SRC/package.json" "$SRC/package-lock.json" "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$DIR/.eddy-installed" 2>/dev/null)" = "$want" ] && [ -s "$DIR/dashboard.schema.json" ]; then
  step "Grafana dashboard schema up to date"
  exit 0
fi
step "generating the Grafana dashboard JSON schema (npm @grafana/schema) into $DIR"
rm -rf "$DIR"
mkdir -p "$DIR"
cp "$SRC/package.json" "$SRC/package-lock.json" "$DIR/"
(
  cd "$DIR"
  # ts-json-schema-generator's own dependencies ask for Node 22 in their engines field; 2.4.0 runs on 18+.
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  node_modules/.bin/ts-json-schema-generator --path "$TYPES" --type Dashboard --out dashboard.schema.json.tmp
  mv dashboard.schema.json.tmp dashboard.schema.json
)
echo "$want" > "$DIR/.eddy-installed"
step "Grafana dashboard schema: $DIR/dashboard.schema.json"
