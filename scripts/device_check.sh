#!/bin/bash
# The GPU check of issue 14, one call on a machine with a GPU (see
# scripts/device_pack.sh): the op and parity tests on the GPU, then
# `clip-wgpu bench` of a ViT-B/32 step (tuned, and each GPU kernel family
# forced), then PyTorch's step on CUDA in fp32 and bf16 autocast. Output
# goes to stdout and, where OUT is set, to $OUT/device_check.log.
# Usage: scripts/device_check.sh [CONFIG] [BATCH]   (default b32 64)
set -uo pipefail
cd "$(dirname "$0")/.."
config=${1:-b32}
batch=${2:-64}
log=${OUT:-/tmp}/device_check.log
exec > >(tee "$log") 2>&1
if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
bin=target/release/clip-wgpu
if [ -d .device ]; then
    gunzip -kf .device/*.gz
    chmod +x .device/clip-wgpu .device/test-*
    bin=.device/clip-wgpu
    # The test binaries read fixtures from the folder they were built in.
    built=$(cat .device/built_in)
    if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"
    fi
fi
export CLIP_WGPU_CACHE_DIR=${CLIP_WGPU_CACHE_DIR:-/tmp/clip-wgpu-cache}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv 2>/dev/null
"$bin" info
echo "== GPU tests"
for t in .device/test-*; do
    [ -x "$t" ] || continue
    case "$t" in *.gz) continue ;; esac
    echo "-- $t"
    "$t" --test-threads 1 2>&1 | grep -E "^test |test result|panicked"
done
echo "== bench $config batch $batch (tuned)"
"$bin" bench --config "$config" --batch "$batch" --reps 5
for m in blocked tiled; do
    echo "== bench $config batch $batch, matmul $m forced"
    "$bin" bench --config "$config" --batch "$batch" --reps 5 --matmul "$m" --step-only
done
echo "== bench $config batch $batch, attention tiled forced"
CLIP_WGPU_ATTENTION=tiled "$bin" bench --config "$config" --batch "$batch" --reps 5 --step-only
for half in fp16 bf16; do
    # fp16: the forward matmuls' operands are f16 values, so the tuner also
    # tries the cooperative-matrix kernel where the adapter has it.
    echo "== bench $config batch $batch, --$half"
    "$bin" bench --config "$config" --batch "$batch" --reps 5 --step-only "--$half"
done
echo "== the tuner's choices"
cat "$CLIP_WGPU_CACHE_DIR"/tune-*.json
for amp in off bf16 fp16; do
    echo "== PyTorch $config batch $batch, autocast $amp"
    python3 scripts/torch_step.py --config "$config" --batch "$batch" --reps 10 --autocast "$amp"
done
