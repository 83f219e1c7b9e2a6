#!/usr/bin/env bash
# On the GPU machine, in the carried checkout: unpacks .devpack/bin.tar.xz into ./devbin and
# links the source path the binaries were built from to this checkout.
set -euo pipefail
rm -rf devbin && mkdir devbin && tar -C devbin --strip-components=1 -xJf .devpack/bin.tar.xz
built=$(cat devbin/source_dir)
if [ -n "$built" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"; fi
