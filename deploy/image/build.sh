#!/usr/bin/env bash
# `make image`: eddy's image with podman. The base is made here from Debian's packages (mmdebstrap,
# then podman import: no base-image registry is needed); the build installs the pinned Python set
# from PyPI, with the host's CA bundle mounted into the build (not baked in) for HTTPS through a proxy.
# EDDY_IMAGE (default localhost/eddy) and EDDY_IMAGE_TAG (default: pyproject's version) name it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
step() { printf '\033[1m[image]\033[0m %s\n' "$*"; }
fail() { printf 'image: %s\n' "$*" >&2; exit 1; }
IMAGE=${EDDY_IMAGE:-localhost/eddy}
TAG=${EDDY_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
BASE=localhost/eddy-base:bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates,openjdk-17-jre-headless,tini,procps
CA=${EDDY_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export CONTAINERS_CONF=$ROOT/deploy/image/containers.conf

missing=$(for t in podman mmdebstrap runc; do command -v "$t" >/dev/null || echo "$t"; done)
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "missing: $missing (apt-get install podman mmdebstrap runc)"
  step "installing podman, mmdebstrap, runc (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah mmdebstrap runc uidmap >/dev/null
fi
[ -d .jars/spark ] && [ -d .jars/flink ] || fail "no .jars/: run make setup first (Maven fetches the jars)"

if [ "$(podman image inspect --format '{{index .Labels "eddy.base"}}' "$BASE" 2>/dev/null)" != "$BASE_PACKAGES" ]; then
  step "base image $BASE from Debian bookworm (mmdebstrap: $BASE_PACKAGES)"
  mkdir -p .tools/image
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm .tools/image/rootfs.tar
  podman import --change "LABEL eddy.base=$BASE_PACKAGES" --change 'CMD ["/bin/bash"]' \
    .tools/image/rootfs.tar "$BASE" >/dev/null
  rm -f .tools/image/rootfs.tar
else
  step "base image $BASE up to date"
fi

step "build context: the code, the specs and the jars only"
CTX=.tools/image/context
rm -rf "$CTX" && mkdir -p "$CTX/.jars"
tar --exclude=__pycache__ --exclude='*.pyc' -cf - constraints.txt pyproject.toml README.md \
  streams features models lakehouse deploy pipelines | tar -C "$CTX" -xf -
cp -r .jars/flink .jars/spark "$CTX/.jars/"

step "building $IMAGE:$TAG"
start=$(date +%s)
podman build --network host --layers -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro" \
  --build-arg BASE="$BASE" -f deploy/image/Containerfile -t "$IMAGE:$TAG" "$CTX"
step "$IMAGE:$TAG built in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE:$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
