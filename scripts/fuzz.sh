#!/usr/bin/env bash
# Long run of the fuzz tests (tests/fuzz.rs): many more iterations than
# `cargo test`, a fresh seed, and a time bound per target.
#
#   scripts/fuzz.sh                 # every target, up to 120 s each
#   scripts/fuzz.sh fuzz_config     # the targets whose names match
#
# Environment:
#   CLIP_WGPU_FUZZ_ITERS  iterations per target (default 10000000: the time
#                         bound ends the run)
#   CLIP_WGPU_FUZZ_SECS   seconds per target (default 120)
#   CLIP_WGPU_FUZZ_SEED   seed (default: from the clock; printed, so a
#                         failure can be replayed with it)
#   CLIP_WGPU_FUZZ_THREADS  targets run at once (default: the CPU count)
#   CLIP_WGPU_FUZZ_VERBOSE  set: list the kinds of error each target met
#
# The debug build is used on purpose: it keeps integer overflow checks, so
# arithmetic on hostile sizes fails loudly. A failing input is saved in
# target/fuzz-failures/ and the message says how to replay it
# (CLIP_WGPU_FUZZ_SEED=... CLIP_WGPU_FUZZ_START=<iteration> CLIP_WGPU_FUZZ_ITERS=1).
set -euo pipefail
cd "$(dirname "$0")/.."

export CLIP_WGPU_FUZZ_ITERS="${CLIP_WGPU_FUZZ_ITERS:-10000000}"
export CLIP_WGPU_FUZZ_SECS="${CLIP_WGPU_FUZZ_SECS:-120}"
export CLIP_WGPU_FUZZ_SEED="${CLIP_WGPU_FUZZ_SEED:-$(date +%s)}"
threads="${CLIP_WGPU_FUZZ_THREADS:-$(nproc 2>/dev/null || echo 2)}"

targets=$(grep -c '^fn fuzz_' tests/fuzz.rs || true)
# Each target stops itself after CLIP_WGPU_FUZZ_SECS; the outer limit also
# covers the build and a target stuck inside one iteration.
limit=$(( (targets + threads - 1) / threads * (CLIP_WGPU_FUZZ_SECS + 30) + 900 ))

echo "fuzz: seed ${CLIP_WGPU_FUZZ_SEED}, up to ${CLIP_WGPU_FUZZ_ITERS} iterations or" \
     "${CLIP_WGPU_FUZZ_SECS} s per target, ${threads} at once, stop after ${limit} s" >&2
timeout --signal=INT --kill-after=30 "${limit}" \
    cargo test --test fuzz -- --nocapture --test-threads "${threads}" "$@"
