#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd of one pinned
# Kubernetes release from Go modules, once per machine, into a cache keyed by version.
# `build-kube.sh node` builds the node's binaries instead (kubelet, kube-scheduler)
# into the same cache, for the real-node environment.
# `go install k8s.io/kubernetes/cmd/...@v` is refused (its go.mod has replace
# directives), so a wrapper module requires k8s.io/kubernetes and replaces every
# staging module with its published v0.x.y tag.
set -euo pipefail

KUBE_VERSION="${POOLKEEPER_KUBE_VERSION:-$(cat "$(dirname "$0")/kube-version")}"
CACHE_ROOT="${POOLKEEPER_CACHE:-$HOME/.cache/poolkeeper}"
OUT="$CACHE_ROOT/kube-$KUBE_VERSION/bin"
ROLE="${1:-control-plane}"
case "$ROLE" in
  control-plane) BINARIES=(kube-apiserver kube-controller-manager kubectl etcd) ;;
  node) BINARIES=(kubelet kube-scheduler) ;;
  *) echo "usage: $0 [control-plane|node]" >&2; exit 2 ;;
esac

have_all() {
  for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || return 1; done
}
if have_all; then
  echo "kube $ROLE binaries $KUBE_VERSION cached in $OUT"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is needed to build the Kubernetes binaries; install Go >= 1.26 (https://go.dev/doc/install) and put it on PATH" >&2
  exit 1
fi

staging_version="v0.${KUBE_VERSION#v1.}"
work="$(mktemp -d "${TMPDIR:-/tmp}/poolkeeper-kube-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

kube_gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[ -f "$kube_gomod" ] || { echo "error: could not download k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
go_directive="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$kube_gomod")"

{
  echo "module poolkeeper.dev/kube-build"
  echo
  echo "go $go_directive"
  echo
  echo "require k8s.io/kubernetes $KUBE_VERSION"
  echo
  sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$staging_version"'#p' "$kube_gomod"
} > go.mod
echo "wrapper go.mod replaces $(grep -c '^replace' go.mod) staging modules with $staging_version"

partial="$OUT.$ROLE.partial"
rm -rf "$partial" && mkdir -p "$partial"
start=$(date +%s)
ldflags="-s -w \
  -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) \
  -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
if [ "$ROLE" = node ]; then
  go build -trimpath -ldflags "$ldflags" -o "$partial/" \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-scheduler
else
  go build -trimpath -ldflags "$ldflags" -o "$partial/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
  go build -trimpath -ldflags "-s -w" -o "$partial/etcd" go.etcd.io/etcd/server/v3
fi
# Each role fills its own names in the shared directory, leaving the other's binaries be.
mkdir -p "$OUT"
for b in "${BINARIES[@]}"; do mv -f "$partial/$b" "$OUT/$b"; done
rm -rf "$partial"
echo "built kube $ROLE binaries $KUBE_VERSION into $OUT in $(( $(date +%s) - start ))s"
