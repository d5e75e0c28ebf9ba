#!/usr/bin/env bash
# Pack what the GPU run needs into .dev/a and .dev/b (ignored by git; each under the device tool's 64 MiB per
# call): the GGUF of the target in two parts, the prepared data cache, and wheels of the pure-Python
# packages the GPU image lacks or holds at other versions (its torch, numpy, tokenizers and safetensors are used).
#   bash bench/gpu/pack.sh        # needs a post cache with smollm2-135m's GGUF and the data fetched
# Then: device call 1 runs bench/gpu/stage.sh (carry .dev/a), call 2 runs bench/gpu/run.sh (carry .dev/b).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${POST_CACHE_DIR:-$HOME/.cache/post}
gguf=$cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || { echo "no $gguf: run post fetch smollm2-135m first" >&2; exit 1; }
rm -rf .dev && mkdir -p .dev/a/whl .dev/b
pins=(transformers huggingface_hub httpx2 httpcore2 truststore gguf jsonargparse typeshed_client dp-accounting
      dm-tree docstring_parser dill regex click)
reqs=()
for p in "${pins[@]}"; do reqs+=("$p==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$p'))")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .dev/a/whl "${reqs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
tar -C "$cache" -cJf .dev/a/data.tar.xz data
head -c 42000000 "$gguf" > .dev/a/gguf.part0
tail -c +42000001 "$gguf" > .dev/b/gguf.part1
sha256sum "$gguf" | cut -d' ' -f1 > .dev/b/gguf.sha256
du -sb .dev/a .dev/b
