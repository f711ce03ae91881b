#!/usr/bin/env bash
# System tools some integration tests use. Installed when missing and we are
# root with apt; otherwise those tests skip and say why.
set -euo pipefail
want=()
command -v promtool >/dev/null || want+=(prometheus)
command -v redis-server >/dev/null || want+=(redis-server)
command -v nginx >/dev/null || want+=(nginx-light)
command -v chromium >/dev/null || want+=(chromium)
command -v espeak-ng >/dev/null || want+=(espeak-ng)
[[ -d /usr/share/dlib ]] || want+=(libdlib-data)
# CRD schemas for the deploy/ checks (npm registry).
if command -v npm >/dev/null && [[ ! -d deploy/validate/node_modules ]]; then
  npm ci --prefix deploy/validate --no-audit --no-fund --loglevel=error >/dev/null 2>&1 || \
    echo "install-test-deps: npm ci in deploy/validate failed; CRD checks will skip" >&2
fi
if ((${#want[@]} == 0)); then exit 0; fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install-test-deps: not root or no apt-get; tests needing ${want[*]} will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null || \
  echo "install-test-deps: could not install ${want[*]}; tests needing them will skip" >&2
