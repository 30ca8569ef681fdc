#!/bin/sh
# GA-DMS pretraining with torchrun on every visible GPU (CPU: one process).
#
#   sh pretrain.sh [key=value ...]
#   CONFIG=configs/pretrain/webperson_1m_paper.yaml sh pretrain.sh data.root=/data
#   NPROC=4 sh pretrain.sh                                  # 4 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 sh pretrain.sh   # multi-node (run on each node)
set -eu
cd "$(dirname "$0")"
CONFIG=${CONFIG:-configs/pretrain/webperson_5m.yaml}
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
