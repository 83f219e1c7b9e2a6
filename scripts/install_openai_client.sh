#!/usr/bin/env bash
# Installs the official `openai` npm package into third_party/npm/ (ignored by git) for the
# `lockstep serve` client tests (tests/serve/test_openai_client.cpp).
#   scripts/install_openai_client.sh
# Idempotent: does nothing when the pinned version is already there. Exits 1 with a message
# when npm is missing or the registry is unreachable; the tests then skip, naming the reason.
# LOCKSTEP_OPENAI_NPM_VERSION picks the package version.
set -euo pipefail
cd "$(dirname "$0")/.."

version=${LOCKSTEP_OPENAI_NPM_VERSION:-4.104.0}
dest=third_party/npm
installed="$dest/node_modules/openai/package.json"

if [ -f "$installed" ] && grep -q "\"version\": \"$version\"" "$installed"; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "install_openai_client: npm or node not found (apt-get install npm)" >&2
  exit 1
fi
mkdir -p "$dest"
if ! timeout 300 npm install --prefix "$dest" --no-audit --no-fund --no-save --silent "openai@$version" >"$dest/install.log" 2>&1; then
  echo "install_openai_client: npm install openai@$version failed (registry unreachable?):" >&2
  sed 's/^/  /' "$dest/install.log" >&2 || true
  exit 1
fi
echo "install_openai_client: openai@$version in $dest"
