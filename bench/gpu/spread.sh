#!/usr/bin/env bash
# GPU call 3 (optional, on the machine run.sh just ran on, while it is warm: runs/gpu is still there): re-run the
# user's tuning and the transfer of `post run gpu` with other seeds (bench/seed_spread.py), so the verdict on
# each bar is not one draw, under a time budget; brings back the table and the runs' small files.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
[ -f runs/gpu/pipeline-result.json ] || { echo "no finished runs/gpu here: run run.sh on this machine first"; exit 3; }
# shellcheck disable=SC2086
timeout -k 10 --signal=INT "${BUDGET:-240}" python3 bench/seed_spread.py --pipeline runs/gpu --seeds ${SEEDS:-1 2 3 4} \
  --out runs/gpu-spread > "$OUT/spread.log" 2>&1
echo "seed_spread rc=$?"
tar -czf "$OUT/gpu-spread.tgz" --exclude='*.safetensors' runs/gpu-spread 2>/dev/null
grep -vE "step [0-9]+/[0-9]+,|^post: " "$OUT/spread.log" | tail -40 | cut -c1-400
