#!/usr/bin/env bash
# Soak test: a long training run of the built-in demo model (tiny CLIP,
# generated pictures) that fails if memory grows after warm-up.
#
# It trains SOAK_STEPS steps (default 1010) at batch 2 with 16-token text,
# a 500-example epoch (so the data loader is rebuilt every 250 steps) and a
# checkpoint every 90 steps (the first one, at step 90, is part of the
# warm-up: readback buffers for saving are made once and reused), then
# compares against step 100:
#   - the process's resident memory (VmRSS of /proc/PID/status, sampled here
#     every 0.2 s): at step 1000 it may be at most 20 MiB and 2% above;
#   - the GPU buffer pool (pool_mib in every metrics.jsonl entry, the bytes the
#     trainer's buffer pool holds): it must not change at all.
# It prints both at steps 100, 500 and 1000. About 5 minutes on lavapipe
# (2 cores); SOAK_TIMEOUT (default 600 s) bounds it.
#
# With SOAK_DATA=DIR it trains on a folder of captioned pictures instead
# (e.g. /usr/share/tuxpaint/stamps from `apt-get install
# tuxpaint-stamps-default`: real captions of varied lengths), with text
# padded to 77 tokens, under the same limits. Real captions meet their
# longest length bucket later than the demo's: SOAK_WARMUP=STEP (default
# 100) moves the step compared against.
#
# Usage: scripts/soak.sh            (uses target/release/clip-wgpu, building it if absent)
#        CLIP_WGPU_BIN=path scripts/soak.sh
#        SOAK_KEEP=dir scripts/soak.sh   (keeps the RSS samples, metrics and log there)
set -euo pipefail
cd "$(dirname "$0")/.."

steps=${SOAK_STEPS:-1010}
# The step memory is compared against (a multiple of 10, below 500).
warm=${SOAK_WARMUP:-100}
timeout_s=${SOAK_TIMEOUT:-600}
bin=${CLIP_WGPU_BIN:-target/release/clip-wgpu}
if [ ! -x "$bin" ]; then
    cargo build --release
fi
if [ "$steps" -lt 1000 ]; then
    echo "soak: SOAK_STEPS must be at least 1000" >&2
    exit 2
fi

work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    if [ -n "${SOAK_KEEP:-}" ]; then
        mkdir -p "$SOAK_KEEP"
        cp "$work/samples" "$work/stderr" "$SOAK_KEEP/" 2>/dev/null || true
        cp "$work/run/metrics.jsonl" "$SOAK_KEEP/" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

out="$work/run"
if [ -n "${SOAK_DATA:-}" ]; then
    data=(--data_dir "$SOAK_DATA" --max_seq_length 77)
    what="$SOAK_DATA, text padded to 77"
else
    data=(--max_seq_length 16 --demo_train_samples 500)
    what="demo model, text length 16"
fi
"$bin" train --output_dir "$out" --do_train \
    --per_device_train_batch_size 2 "${data[@]}" \
    --max_steps "$steps" --logging_steps 10 --save_steps 90 --save_total_limit 1 \
    --learning_rate 5e-4 --warmup_steps 50 --no_progress \
    >"$work/stdout" 2>"$work/stderr" &
pid=$!

metrics="$out/metrics.jsonl"
samples="$work/samples"
: >"$samples"
start=$(date +%s)
# Every 0.2 s: the last step logged and the process's VmRSS (KiB).
while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    step=$(tail -n 1 "$metrics" 2>/dev/null | grep -o '"step":[0-9]*' | cut -d: -f2 || true)
    if [ -n "$rss" ] && [ -n "$step" ]; then
        echo "$step $rss" >>"$samples"
    fi
    if [ $(($(date +%s) - start)) -gt "$timeout_s" ]; then
        echo "soak: FAILED: still running after ${timeout_s} s" >&2
        tail -n 5 "$work/stderr" >&2
        exit 1
    fi
    sleep 0.2
done
rc=0
wait "$pid" || rc=$?
pid=
elapsed=$(($(date +%s) - start))
if [ "$rc" -ne 0 ]; then
    echo "soak: FAILED: training exited with $rc" >&2
    tail -n 20 "$work/stderr" >&2
    exit 1
fi

# RSS (KiB) of the first sample taken at or after a step.
rss_at() {
    awk -v s="$1" '$1 >= s { print $2; exit }' "$samples"
}
# pool_mib logged at a step.
pool_at() {
    grep "\"step\":$1[,}]" "$metrics" | grep -o '"pool_mib":[0-9.eE+-]*' | cut -d: -f2 | head -n 1
}

fail=0
echo "soak: $steps steps in ${elapsed} s ($what, batch 2, a checkpoint every 90 steps)"
printf '%6s %10s %12s\n' step rss_mib pool_mib
for s in "$warm" 500 1000; do
    r=$(rss_at "$s")
    p=$(pool_at "$s")
    if [ -z "$r" ] || [ -z "$p" ]; then
        echo "soak: FAILED: no sample at step $s" >&2
        exit 1
    fi
    printf '%6s %10.1f %12s\n' "$s" "$(echo "$r" | awk '{print $1 / 1024}')" "$p"
done

r100=$(rss_at "$warm")
r1000=$(rss_at 1000)
growth=$((r1000 - r100))
limit=$((20 * 1024))
pct=$((r100 / 50))
if [ "$pct" -lt "$limit" ]; then limit=$pct; fi
echo "rss growth from step $warm to 1000: $((growth / 1024)) MiB, $(awk -v g="$growth" -v r="$r100" 'BEGIN { printf "%.2f", 100 * g / r }')% (limit $((limit / 1024)) MiB)"
if [ "$growth" -gt "$limit" ]; then
    echo "soak: FAILED: resident memory grew by $((growth / 1024)) MiB" >&2
    fail=1
fi

# The pool: every entry from the warm-up step on holds exactly its bytes.
p100=$(pool_at "$warm")
changed=$(awk -v p="$p100" -v w="$warm" '
    match($0, /"step":[0-9]+/) { s = substr($0, RSTART + 7, RLENGTH - 7) + 0 }
    match($0, /"pool_mib":[^,}]+/) { q = substr($0, RSTART + 11, RLENGTH - 11) }
    s >= w && q != p { print s ": " q }' "$metrics")
if [ -n "$changed" ]; then
    echo "soak: FAILED: the buffer pool changed after step $warm (step: MiB):" >&2
    echo "$changed" | head -n 10 >&2
    fail=1
fi
if [ "$fail" -ne 0 ]; then
    exit 1
fi
echo "soak: 1 passed, 0 failed"
