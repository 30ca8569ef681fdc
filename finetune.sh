#!/bin/sh
# Fine-tuning (IRRA recipe) with torchrun on every visible GPU.
#
#   sh finetune.sh --finetune ckpt.pth [key=value ...]            # CUHK-PEDES
#   DATASET=RSTPReid sh finetune.sh --finetune ckpt.pth data.root=/data
#   (DATASET: CUHK-PEDES | ICFG-PEDES | RSTPReid; or CONFIG=path/to.yaml)
#   Processes, nodes and SLURM: as pretrain.sh (scripts/launch.sh).
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
exec sh scripts/launch.sh "$CONFIG" "$@"
