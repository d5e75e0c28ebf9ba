#!/usr/bin/env bash
# GPU call 2 of 2 (carry .dev/b; on the machine stage.sh ran on, which holds the GGUF's first part): rebuild and
# check the target's GGUF, run `post run gpu` (distillation in bf16 for up to 4 minutes, then cpu-full's pipeline)
# under a time budget, and bring back the logs, the results and every run's small files (no weights).
set -uo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
source bench/gpu/env.sh
budget=${BUDGET:-520}
[ -f /tmp/post-stage/gguf.part0 ] || { echo "no /tmp/post-stage/gguf.part0: run stage.sh on this machine first"; exit 3; }
gguf=/tmp/post-cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/post-stage/gguf.part0 .dev/b/gguf.part1 > "$gguf"
[ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat .dev/b/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 4; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu-util.csv" 2>&1 &
mon=$!
# shellcheck disable=SC2086
timeout -k 10 --signal=INT "$budget" python3 -m post run gpu ${EXTRA:-} > "$OUT/run.log" 2>&1
echo "post run gpu rc=$? after $((SECONDS - t0)) s"
kill $mon 2>/dev/null
tar -czf "$OUT/gpu-runs.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' runs/gpu 2>/dev/null
cp runs/gpu/report.md "$OUT/" 2>/dev/null
grep -vE "step [0-9]+/[0-9]+," "$OUT/run.log" | tail -60 | cut -c1-400
