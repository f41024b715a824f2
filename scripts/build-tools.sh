#!/usr/bin/env bash
# Builds the two tools the chart and alert tests run, from Go modules, once per
# machine, into a cache keyed by version (like build-kube.sh):
#   helm      helm.sh/helm/v3/cmd/helm                         (helm lint/template/install of charts/poolkeeper)
#   promtool  github.com/prometheus/prometheus/cmd/promtool    (promtool check/test rules of the PrometheusRule)
# promtool is built with the `remove_all_sd` tag: rule checks and tests need none of
# Prometheus' service-discovery plugins, and leaving out their cloud SDKs keeps the
# first build to a few minutes. `build-tools.sh path helm|promtool` prints where a
# tool is (built or not). A tool that fails to build fails this script; the tests
# that need it skip, saying so.
set -euo pipefail

HELM_VERSION="${POOLKEEPER_HELM_VERSION:-v3.22.0}"
PROMETHEUS_VERSION="${POOLKEEPER_PROMETHEUS_VERSION:-v0.316.0}"   # Go module version of Prometheus 3.16
CACHE_ROOT="${POOLKEEPER_CACHE:-$HOME/.cache/poolkeeper}"
HELM_BIN="$CACHE_ROOT/helm-$HELM_VERSION/bin/helm"
PROMTOOL_BIN="$CACHE_ROOT/promtool-$PROMETHEUS_VERSION/bin/promtool"

if [ "${1:-}" = path ]; then
  case "${2:-}" in
    helm) echo "$HELM_BIN" ;;
    promtool) echo "$PROMTOOL_BIN" ;;
    *) echo "usage: $0 path helm|promtool" >&2; exit 2 ;;
  esac
  exit 0
fi

if [ -x "$HELM_BIN" ] && [ -x "$PROMTOOL_BIN" ]; then
  echo "helm $HELM_VERSION and promtool $PROMETHEUS_VERSION cached in $CACHE_ROOT"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is needed to build helm and promtool; install Go >= 1.26 and put it on PATH" >&2
  exit 1
fi
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

# go install into a directory of its own, then rename: an interrupted build leaves no
# binary behind, and two set-ups running at once do not share a half-written one.
build() { # name binary package version [go flags...]
  local name="$1" bin="$2" package="$3" version="$4"; shift 4
  [ -x "$bin" ] && return 0
  local partial; partial="$(mktemp -d "$bin.partial.XXXXXX")"
  local start; start=$(date +%s)
  GOBIN="$partial" go install -trimpath "$@" "$package@$version" || { rm -rf "$partial"; return 1; }
  mv -f "$partial/$name" "$bin"
  rm -rf "$partial"
  echo "built $name $version into $bin in $(( $(date +%s) - start ))s"
}

mkdir -p "$(dirname "$HELM_BIN")" "$(dirname "$PROMTOOL_BIN")"
if [ ! -x "$HELM_BIN" ]; then
  # helm renders for the Kubernetes version of the client-go it is built with (its Makefile
  # sets it; without, `helm template` assumes v1.20 and refuses charts that need more).
  helm_gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  kube_minor="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$helm_gomod")"
  [ -n "$kube_minor" ] || { echo "error: no k8s.io/client-go in helm $HELM_VERSION's go.mod" >&2; exit 1; }
  build helm "$HELM_BIN" helm.sh/helm/v3/cmd/helm "$HELM_VERSION" \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
      -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor"
fi
build promtool "$PROMTOOL_BIN" github.com/prometheus/prometheus/cmd/promtool "$PROMETHEUS_VERSION" \
  -tags remove_all_sd -ldflags "-s -w"
