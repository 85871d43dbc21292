#!/usr/bin/env bash
# Per-step time of 1 process vs N ranks at the same global batch, and the
# time and bytes of each rank's MPI calls per step, from the runs' own
# metrics.jsonl (medians over the steps after the first two).
#
#   scripts/mpi_scaling.sh [RANKS] [GLOBAL_BATCH] [STEPS] [-- extra train flags]
#
# GLOBAL_BATCH is per micro-batch (world x per-device); with
# --gradient_accumulation_steps K among the extra flags a step trains K of them.
#
# Needs `cargo build --release --features mpi` and mpirun. With no model
# flags it trains the built-in demo model on demo pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}; global=${2:-32}; steps=${3:-12}
shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--" ] && shift
bin=target/release/clip-wgpu
[ $((global % ranks)) -eq 0 ] || { echo "GLOBAL_BATCH must be a multiple of RANKS" >&2; exit 1; }
out=$(mktemp -d)
common=(--do_train --max_steps "$steps" --logging_steps 1 --no_progress --overwrite_output_dir
        --demo_train_samples $((global * steps)) "$@")
mpi=(mpirun --bind-to none)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
mpi+=(--oversubscribe)
"$bin" train --output_dir "$out/one" --per_device_train_batch_size "$global" "${common[@]}" >/dev/null 2>"$out/one.log"
"${mpi[@]}" -n "$ranks" "$bin" train --output_dir "$out/many" \
    --per_device_train_batch_size $((global / ranks)) "${common[@]}" >/dev/null 2>"$out/many.log"
accum=1
prev=""
for a in "$@"; do
    [ "$prev" = "--gradient_accumulation_steps" ] && accum=$a
    prev=$a
done
python3 - "$out" "$ranks" "$global" "$accum" <<'PY'
import json, statistics, sys
out, ranks, g, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rows(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if '"images_per_second"' in l][2:]
one, many = rows("one"), rows("many")
t1 = statistics.median(g * k / r["images_per_second"] for r in one)
tn = statistics.median(g * k / r["images_per_second"] for r in many)
mpi = statistics.median(r["mpi_seconds_per_step"] for r in many)
mib = statistics.median(r["mpi_mib_sent_per_step"] for r in many)
acc = f" x {k} accumulated" if k > 1 else ""
print(f"global batch {g}{acc}, medians of {len(one)} steps:")
print(f"  1 process x batch {g}{acc}: {t1*1e3:.0f} ms per step")
print(f"  {ranks} ranks x batch {g//ranks}{acc}: {tn*1e3:.0f} ms per step ({tn/t1:.2f}x), "
      f"of which MPI calls {mpi*1e3:.0f} ms ({mpi/tn*100:.0f}%), {mib:.1f} MiB sent per rank")
PY
rm -rf "$out"
