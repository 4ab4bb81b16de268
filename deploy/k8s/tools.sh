#!/usr/bin/env bash
# The offline Kubernetes toolbox of `make k8s-check`, all under .tools/ (gitignored): helm and
# kubeconform built from their Go modules, the Kubernetes JSON schemas, and JSON schemas of the
# operators' CRDs (Strimzi, Flink operator, KEDA, Spark operator, Prometheus operator).
# Idempotent: each step keeps a stamp of what it installed and is skipped when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# Pinned versions.
HELM=v3.22.0
KUBECONFORM=v0.8.0
KUBERNETES_VALIDATE=1.37.0     # PyPI; ships the schemas of several Kubernetes releases
K8S_VERSION=v1.34.0            # the Kubernetes release the chart is validated against
STRIMZI=1.2.0                  # Maven io.strimzi:api + crd-generator (serves kafka.strimzi.io/v1)
FLINK_OPERATOR=1.10.0          # Maven org.apache.flink:flink-kubernetes-operator-api (newest served)
KEDA=v2.21.0                   # Go module github.com/kedacore/keda/v2
SPARK_OPERATOR=v2.4.0          # Go module github.com/kubeflow/spark-operator/v2
PROMETHEUS_OPERATOR=v0.85.0    # Go module github.com/prometheus-operator/prometheus-operator

T=$ROOT/.tools
PY=${PYTHON:-$ROOT/.venv/bin/python}
step() { printf '\033[1m[k8s-tools]\033[0m %s\n' "$*"; }
fail() { printf 'k8s-tools: %s\n' "$*" >&2; exit 1; }
# stamp NAME VALUE: true when NAME was last installed as VALUE
fresh() { [ "$(cat "$T/.stamp-$1" 2>/dev/null)" = "$2" ]; }
done_() { echo "$2" > "$T/.stamp-$1"; }
mkdir -p "$T/bin" "$T/dl"
[ -x "$PY" ] || fail "no Python at $PY: run make setup first (or set PYTHON)"
command -v go >/dev/null || fail "Go is needed to build helm and kubeconform: apt-get install golang (1.24+)"
command -v mvn >/dev/null || fail "Maven is needed for the Strimzi and Flink operator CRDs: apt-get install maven"

# Go's and Maven's own caches (the user's, as every Go and Maven build uses), so a fresh clone on a
# machine that built these once compiles in seconds; the tools themselves go to .tools/bin.
export GOBIN=$T/bin GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN=local
MVN=(mvn -q -B)

# 1. helm and kubeconform
for tool in "helm helm.sh/helm/v3/cmd/helm@$HELM" "kubeconform github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM"; do
  set -- $tool
  if fresh "$1" "$2" && [ -x "$T/bin/$1" ]; then step "$1 up to date"; continue; fi
  step "building $2 (helm: minutes the first time)"
  go install "$2" 2>&1 | { grep -v '^go: downloading' || true; }
  done_ "$1" "$2"
done

# 2. Kubernetes JSON schemas (refs rewritten so kubeconform can load them)
want="$KUBERNETES_VALIDATE $K8S_VERSION $(sha256sum deploy/k8s/crd_to_jsonschema.py | cut -c1-16)"
if ! fresh kube-schemas "$want" || [ ! -d "$T/k8s-schemas/$K8S_VERSION" ]; then
  step "Kubernetes $K8S_VERSION schemas from kubernetes-validate $KUBERNETES_VALIDATE"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "kubernetes-validate==$KUBERNETES_VALIDATE" -d "$T/dl"
  rm -rf "$T/k8s-schemas"
  "$PY" -m deploy.k8s.crd_to_jsonschema kube "$T/dl/kubernetes_validate-$KUBERNETES_VALIDATE-py3-none-any.whl" \
    "$K8S_VERSION" "$T/k8s-schemas/$K8S_VERSION"
  done_ kube-schemas "$want"
else
  step "Kubernetes schemas up to date"
fi

# 3. CRDs as YAML into .tools/crds/<operator>/
java21() {  # the first Java 21 or newer: $JAVA21, then the JDKs under /usr/lib/jvm, then java on PATH
  local j
  for j in ${JAVA21:-} /usr/lib/jvm/*/bin/java "$(command -v java || true)"; do
    [ -x "$j" ] || continue
    [ "$("$j" -XshowSettings:properties -version 2>&1 | sed -n 's/.*java.specification.version = //p')" -ge 21 ] 2>/dev/null \
      && { echo "$j"; return; }
  done
  fail "Strimzi's CRD generator needs Java 21 or newer: set JAVA21=/path/to/bin/java"
}
want="$STRIMZI $(sha256sum deploy/k8s/strimzi-crds.pom.xml | cut -c1-16)"
if ! fresh strimzi "$want"; then
  step "Strimzi $STRIMZI CRDs (crd-generator from Maven, on Java 21+)"
  rm -rf "$T/strimzi" "$T/crds/strimzi" && mkdir -p "$T/crds/strimzi"
  "${MVN[@]}" -f deploy/k8s/strimzi-crds.pom.xml -Dstrimzi.version="$STRIMZI" \
    dependency:copy-dependencies -DoutputDirectory="$T/strimzi"
  m=io.strimzi.api.kafka.model
  "$(java21)" -cp "$T/strimzi/*" io.strimzi.crdgenerator.CrdGenerator --target-kube 1.16+ \
    --crd-api-version v1 --api-versions v1 --storage-version v1 --yaml \
    "$m.kafka.Kafka=$T/crds/strimzi/kafka.yaml" "$m.nodepool.KafkaNodePool=$T/crds/strimzi/kafkanodepool.yaml" \
    "$m.topic.KafkaTopic=$T/crds/strimzi/kafkatopic.yaml" "$m.user.KafkaUser=$T/crds/strimzi/kafkauser.yaml" >/dev/null
  done_ strimzi "$want"
else
  step "Strimzi CRDs up to date"
fi

if ! fresh flink-operator "$FLINK_OPERATOR"; then
  step "Flink Kubernetes Operator $FLINK_OPERATOR CRDs (operator-api jar from Maven)"
  rm -rf "$T/crds/flink" && mkdir -p "$T/crds/flink"
  "${MVN[@]}" dependency:copy "-Dartifact=org.apache.flink:flink-kubernetes-operator-api:$FLINK_OPERATOR" \
    -DoutputDirectory="$T/dl"
  # fabric8 writes one file per apiextensions version: "-v1.yml" are the apiextensions.k8s.io/v1 CRDs
  (cd "$T/crds/flink" && unzip -q -j -o "$T/dl/flink-kubernetes-operator-api-$FLINK_OPERATOR.jar" 'META-INF/fabric8/*-v1.yml')
  done_ flink-operator "$FLINK_OPERATOR"
else
  step "Flink operator CRDs up to date"
fi

gomod_crds() {  # NAME MODULE VERSION DIR-IN-MODULE: copy the module's generated CRD YAMLs
  local name=$1 module=$2 version=$3 sub=$4 dir
  if fresh "$name" "$module@$version"; then step "$name CRDs up to date"; return; fi
  step "$name CRDs from Go module $module@$version"
  dir=$(go mod download -json "$module@$version" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  [ -d "$dir/$sub" ] || fail "$module@$version has no $sub"
  rm -rf "$T/crds/$name" && mkdir -p "$T/crds/$name"
  cp "$dir/$sub"/*.yaml "$T/crds/$name/"
  done_ "$name" "$module@$version"
}
gomod_crds keda github.com/kedacore/keda/v2 "$KEDA" config/crd/bases
gomod_crds spark-operator github.com/kubeflow/spark-operator/v2 "$SPARK_OPERATOR" config/crd/bases
gomod_crds prometheus-operator github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR" \
  example/prometheus-operator-crd

# 4. CRD JSON schemas, {group}/{kind}_{version}.json
want=$( (cat "$T"/.stamp-strimzi "$T"/.stamp-flink-operator "$T"/.stamp-keda "$T"/.stamp-spark-operator \
  "$T"/.stamp-prometheus-operator deploy/k8s/crd_to_jsonschema.py) | sha256sum | cut -c1-16)
if ! fresh crd-schemas "$want" || [ ! -d "$T/crd-schemas" ]; then
  step "converting CRDs to JSON schemas"
  rm -rf "$T/crd-schemas"
  "$PY" -m deploy.k8s.crd_to_jsonschema crd "$T/crd-schemas" "$T"/crds/*/*.y*ml >/dev/null
  done_ crd-schemas "$want"
else
  step "CRD schemas up to date"
fi
step "ready: $(ls "$T"/crd-schemas/*/*.json | wc -l) CRD schemas, $(ls "$T/k8s-schemas/$K8S_VERSION" | wc -l) Kubernetes schemas"
