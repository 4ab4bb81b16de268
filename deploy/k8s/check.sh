#!/usr/bin/env bash
# `make k8s-check`: the Helm chart checked offline. helm lint and helm template for each values
# profile (deploy/helm/eddy/ci/*-values.yaml) with the values derived from the pipeline spec;
# kubeconform -strict of every rendered object against the Kubernetes and the operators' CRD schemas,
# and proof that every object was validated (none skipped, none without a schema); then the chart's
# tests (tests/k8s). Renders are left in .tools/k8s-rendered/ for a look.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
T=$ROOT/.tools
K8S_VERSION=$(sed -n 's/^K8S_VERSION=\(v[0-9.]*\).*/\1/p' deploy/k8s/tools.sh)
CHART=${EDDY_K8S_CHART:-deploy/helm/eddy}   # another copy of the chart can be checked (a broken one, say)
export EDDY_K8S_CHART=$CHART
OUT=$T/k8s-rendered
step() { printf '\033[1m[k8s-check]\033[0m %s\n' "$*"; }
fail() { printf 'k8s-check: %s\n' "$*" >&2; exit 1; }

bash deploy/k8s/tools.sh
rm -rf "$OUT" && mkdir -p "$OUT"
for spec in pipelines/fraud.yaml pipelines/sensors.yaml; do
  "$PY" -m deploy.k8s.values_from_spec "$spec" > "$OUT/values-$(basename "$spec" .yaml).yaml"
done

# What kubeconform says of one render, against the objects in it: every one validated and valid.
verify() {  # RENDER KUBECONFORM_JSON
  "$PY" - "$1" "$2" <<'EOF'
import collections, json, sys, yaml
render, report = sys.argv[1], json.load(open(sys.argv[2]))
docs = [d for d in yaml.safe_load_all(open(render)) if d]
kinds = collections.Counter(f"{d['kind']} ({d['apiVersion']})" for d in docs)
statuses = collections.Counter(r["status"] for r in report.get("resources", []))
bad = [f"{r['kind']} {r['name']}: {r['status']} {r.get('msg', '')}" for r in report.get("resources", [])
       if r["status"] != "statusValid"]
print("    " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
if bad or statuses["statusValid"] != len(docs):
    print(f"    rendered {len(docs)} objects, kubeconform validated {statuses['statusValid']}: "
          f"{dict(statuses)}", file=sys.stderr)
    print("\n".join("    " + b for b in bad), file=sys.stderr)
    sys.exit(1)
print(f"    {len(docs)} objects rendered, {len(docs)} valid")
EOF
}

failed=0
render() {  # NAME SPEC_VALUES PROFILE
  local name=$1 spec_values=$2 profile=$3
  step "$name: helm lint, helm template, kubeconform"
  "$T/bin/helm" lint --strict --quiet --kube-version "${K8S_VERSION#v}" "$CHART" -f "$spec_values" -f "$profile" >"$OUT/$name.lint" 2>&1 \
    || { cat "$OUT/$name.lint" >&2; fail "helm lint failed for $name"; }
  # (helm notes on stderr that files/monitoring is a link to deploy/monitoring)
  "$T/bin/helm" template eddy "$CHART" --namespace eddy --kube-version "${K8S_VERSION#v}" \
    -f "$spec_values" -f "$profile" > "$OUT/$name.yaml" 2>"$OUT/$name.stderr" \
    || { cat "$OUT/$name.stderr" >&2; fail "helm template failed for $name"; }
  "$T/bin/kubeconform" -strict -summary -verbose -output json -kubernetes-version "${K8S_VERSION#v}" \
    -schema-location "$T/k8s-schemas/$K8S_VERSION/{{.ResourceKind}}{{.KindSuffix}}.json" \
    -schema-location "$T/crd-schemas/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json" \
    "$OUT/$name.yaml" > "$OUT/$name.kubeconform.json" || true   # verify judges, from the report
  verify "$OUT/$name.yaml" "$OUT/$name.kubeconform.json" || failed=1
}
for profile in "$CHART"/ci/*-values.yaml; do
  render "fraud-$(basename "$profile" -values.yaml)" "$OUT/values-fraud.yaml" "$profile"
done
render sensors-default "$OUT/values-sensors.yaml" "$CHART/ci/default-values.yaml"
[ "$failed" = 0 ] || fail "kubeconform found objects that are invalid or were not validated (above)"

step "chart tests (tests/k8s)"
"$PY" -m pytest tests/k8s -q -p no:cacheprovider
