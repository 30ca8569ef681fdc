#!/bin/sh
# GA-DMS pretraining with torchrun on every visible GPU (CPU: one process).
#
#   sh pretrain.sh [key=value ...]
#   CONFIG=configs/pretrain/webperson_1m_paper.yaml sh pretrain.sh data.root=/data
#   NPROC=4 sh pretrain.sh                                  # 4 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 sh pretrain.sh   # multi-node (run on each node)
#   srun --ntasks-per-node=1 sh pretrain.sh                 # SLURM: one launcher per node (docs/slurm.md)
set -eu
cd "$(dirname "$0")"
CONFIG=${CONFIG:-configs/pretrain/webperson_5m.yaml}
exec sh scripts/launch.sh "$CONFIG" "$@"
