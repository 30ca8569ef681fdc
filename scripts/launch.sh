#!/bin/sh
# The launcher behind pretrain.sh and finetune.sh: one torchrun per node.
#
#   sh scripts/launch.sh CONFIG [tools/train.py arguments ...]
#
# Environment (each optional): PYTHON (default .venv/bin/python, else python3), NPROC (processes on this
# node; default every visible GPU, at least 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Inside a SLURM allocation (SLURM_JOB_ID set) the defaults come from SLURM's variables: NNODES from
# SLURM_NNODES, NODE_RANK from SLURM_NODEID, MASTER_ADDR from the first host of SLURM_JOB_NODELIST,
# MASTER_PORT 20000 + SLURM_JOB_ID mod 10000 (one port per job), NPROC from SLURM_GPUS_ON_NODE. Run it once
# per node: `srun --ntasks-per-node=1 sh pretrain.sh ...` (docs/slurm.md).
set -eu
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "launch.sh: usage: sh scripts/launch.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    if [ -z "${MASTER_ADDR:-}" ]; then
        if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
            echo "launch.sh: SLURM_JOB_NODELIST is not set; set MASTER_ADDR" >&2
            exit 2
        fi
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-}}
    echo "launch.sh: SLURM job $SLURM_JOB_ID: node $NODE_RANK of $NNODES, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
fi
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    tools/train.py --config "$CONFIG" "$@"
