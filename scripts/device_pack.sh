#!/bin/bash
# Packs what scripts/device_check.sh runs on a machine with a GPU but no
# Rust (the device tool's H200): the stripped, compressed release binary and
# the GPU test binaries, into .device/ (ignored by git; name it in the
# device run's `carry`). Run here, in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
tests="matmul attention reduce layernorm softmax self_verify parity mlp adamw loss"
args=()
for t in $tests; do args+=(--test "$t"); done
cargo build --release
json=$(cargo test --release --no-run --message-format=json "${args[@]}" 2>/dev/null)
rm -rf .device && mkdir -p .device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
strip -o .device/clip-wgpu target/release/clip-wgpu
for t in $tests; do
    exe=$(echo "$json" | python3 -c "
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])")
    strip -o ".device/test-$t" "$exe"
done
gzip -9 .device/*
# Test binaries find the fixtures where they were built.
pwd >.device/built_in
du -sh .device
