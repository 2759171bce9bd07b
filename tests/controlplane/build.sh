#!/usr/bin/env bash
# Builds the real Kubernetes control plane for the test rig from Kubernetes' own Go modules:
# kube-apiserver, kube-controller-manager, kube-proxy, kubectl (k8s.io/kubernetes/cmd/...) and
# etcd (go.etcd.io/etcd/server/v3/etcdmain, at the version k8s.io/kubernetes requires).
#
# The binaries are cached outside the work tree, keyed by the hash of go.sum (and go.mod and the
# etcd entry point), so a machine builds them once:
#   ${UNDERLAY_CONTROLPLANE_CACHE:-$HOME/.cache/underlay/controlplane}/<key>/bin/
# The last line on stdout is that bin directory; progress and the build time go to stderr.
# `--print-dir` prints the directory without building (it may not exist yet).
#
# usage: tests/controlplane/build.sh [--print-dir]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${UNDERLAY_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/underlay/controlplane}
key=$(cat "$here/go.sum" "$here/go.mod" "$here/cmd/etcd/main.go" | sha256sum | cut -c1-16)
dest="$cache_root/$key"
bins=(kube-apiserver kube-controller-manager kube-proxy kubectl etcd)

if [ "${1:-}" = "--print-dir" ]; then
  echo "$dest/bin"
  exit 0
fi

complete=1
for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || complete=0; done
if [ "$complete" -eq 1 ]; then
  echo "control plane: cached in $dest/bin (key $key)" >&2
  echo "$dest/bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not on PATH (Go >= 1.26 is needed)" >&2; exit 1; }
started=$(date +%s)
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")
[ -n "$k8s_version" ] || k8s_version=$(awk '/^require k8s.io\/kubernetes/ {print $3; exit}' "$here/go.mod")
[[ $k8s_version =~ ^v1\.([0-9]+)\. ]] || { echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
minor=${BASH_REMATCH[1]}
cd "$here"
# The release date of the module, so /version's buildDate is the same on every machine.
build_date=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit="
done

mkdir -p "$cache_root"
tmp=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "control plane: building ${bins[*]} ($k8s_version) into $dest/bin" >&2
GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl \
  ./cmd/etcd
"$tmp/bin/kube-apiserver" --version >&2
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "control plane: built in $(( $(date +%s) - started ))s" >&2
echo "$dest/bin"
