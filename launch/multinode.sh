#!/usr/bin/env bash
# One region per node: run this on every node of the job with the same RDZV_ENDPOINT and RUN_ID.
#   RDZV_ENDPOINT=node0:29400 RUN_ID=exp1 NNODES=2 NPROC=8 launch/multinode.sh configs/gpu-150m.yaml [--set k=v ...]
# torchrun numbers ranks node by node, so with NPROC = topology.ranks_per_region every node is one
# region. run.dir must be on a filesystem every node sees (checkpoints, tokenizer, metrics).
set -euo pipefail
config=$1
shift
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:?set NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT}" --rdzv-id "${RUN_ID:?set RUN_ID}" \
    -m cocodc.train -c "$config" "$@"
