#!/usr/bin/env bash
# GPU call 1 of 2 (carry .dev/a, made by pack.sh): install the carried wheels, unpack the data cache, keep the
# GGUF's first part in /tmp for call 2, then run the `gpu` pipeline on tiny models on the GPU (every step, both
# modes) so that a CUDA-only failure shows in seconds rather than after the distillation.
set -uo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
source bench/gpu/env.sh
mkdir -p /tmp/post-stage /tmp/post-cache/downloads
cp .dev/a/gguf.part0 /tmp/post-stage/
tar -C /tmp/post-cache -xJf .dev/a/data.tar.xz
# WHEELS=0 and EXTRA (more overrides, e.g. device=cpu) rehearse this script on a CPU machine.
[ "${WHEELS:-1}" = 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .dev/a/whl/*.whl 2>&1 | tail -3
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import sys, torch, transformers, accelerate, numpy, tokenizers, huggingface_hub, safetensors
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'numpy', numpy.__version__,
      'tokenizers', tokenizers.__version__, 'hub', huggingface_hub.__version__, 'safetensors', safetensors.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
  python3 -c "import post.cli, post.pipeline.run, post.distill, post.tune, post.transfer, post.evaluate, post.dp
import post.accounting, post.report, post.zst, dp_accounting, gguf; print('imports ok')"
} 2>&1 | tee "$OUT/env.txt"
echo "staged in $((SECONDS - t0)) s"
[ "${SMOKE:-1}" = 0 ] && exit 0  # a second try on a fresh machine can skip the smoke run
s0=$SECONDS
# shellcheck disable=SC2046
timeout -k 5 170 python3 -m post run gpu --out /tmp/smoke $(cat bench/gpu/smoke-overrides.txt) ${EXTRA:-} > "$OUT/smoke.log" 2>&1
echo "smoke rc=$? in $((SECONDS - s0)) s"
grep -E "Error|error:|Traceback" "$OUT/smoke.log" | head -5
grep -E "^\| mr|pipeline finished" "$OUT/smoke.log" | cut -c1-160
