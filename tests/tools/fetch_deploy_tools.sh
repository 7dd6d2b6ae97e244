#!/usr/bin/env bash
# Tools that validate deploy/ offline (tests/test_deploy.py), built from the Go module proxy
# into .tools/bin: helm (lint, template), kubeconform (rendered manifests against Kubernetes
# schemas), promtool (alert rules), plus the Compose Specification's JSON schema taken from the
# compose-go module. Idempotent: a tool already at its pinned version is not rebuilt.
set -euo pipefail
DEST="${1:-.tools}"
mkdir -p "$DEST/bin" "$DEST/share"
DEST="$(cd "$DEST" && pwd)"

HELM=helm.sh/helm/v4/cmd/helm@v4.3.2
KUBECONFORM=github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
PROMTOOL=github.com/prometheus/prometheus/cmd/promtool@v0.316.0
COMPOSE_GO=github.com/compose-spec/compose-go/v2@v2.16.2

# Builds are cached by Go; the stamp (module@version and tags) says which build a binary is.
install() {
  local name="$1" module="$2" tags="${3:-}"
  if [[ -x "$DEST/bin/$name" && "$(cat "$DEST/bin/.$name.version" 2>/dev/null)" == "$module $tags" ]]; then
    return 0
  fi
  echo "building $name ($module)"
  GOBIN="$DEST/bin" GOFLAGS=-buildvcs=false go install -tags "$tags" "$module"
  echo "$module $tags" >"$DEST/bin/.$name.version"
}

command -v go >/dev/null || { echo "fetch_deploy_tools: Go is required (go install)" >&2; exit 1; }
install kubeconform "$KUBECONFORM"
install helm "$HELM"
# Without the cloud service-discovery plugins (rule checks need none): a much smaller build.
install promtool "$PROMTOOL" remove_all_sd

schema="$DEST/share/compose-spec.json"
if [[ "$(cat "$schema.version" 2>/dev/null)" != "$COMPOSE_GO" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$COMPOSE_GO" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  test -f "$dir/schema/compose-spec.json"
  cp "$dir/schema/compose-spec.json" "$schema"
  echo "$COMPOSE_GO" >"$schema.version"
fi
echo "deploy tools in $DEST/bin"
