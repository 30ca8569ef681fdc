#!/bin/sh
# Fine-tuning (IRRA recipe) with torchrun on every visible GPU.
#
#   sh finetune.sh --finetune ckpt.pth [key=value ...]            # CUHK-PEDES
#   DATASET=RSTPReid sh finetune.sh --finetune ckpt.pth data.root=/data
#   (DATASET: CUHK-PEDES | ICFG-PEDES | RSTPReid; or CONFIG=path/to.yaml)
set -eu
cd "$(dirname "$0")"
DATASET=${DATASET:-CUHK-PEDES}
case "$DATASET" in
    CUHK-PEDES) default_config=configs/finetune/cuhkpedes.yaml ;;
    ICFG-PEDES) default_config=configs/finetune/icfgpedes.yaml ;;
    RSTPReid) default_config=configs/finetune/rstpreid.yaml ;;
    *) echo "finetune.sh: unknown DATASET '$DATASET' (CUHK-PEDES, ICFG-PEDES or RSTPReid)" >&2; exit 2 ;;
esac
CONFIG=${CONFIG:-$default_config}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    tools/train.py --config "$CONFIG" "$@"
