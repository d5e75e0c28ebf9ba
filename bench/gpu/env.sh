# Sourced by stage.sh and run.sh on the GPU machine: the carried wheels ahead of the image's packages, the
# project from src/, the post cache in /tmp, no hub access.
export PYTHONPATH=/tmp/site:$PWD/src POST_CACHE_DIR=/tmp/post-cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/post-out}
mkdir -p "$OUT"
