#!/usr/bin/env bash
# ft.enabled on several nodes: one torchrun job per region, each restarted by its torchrun.
# The lighthouse runs once, on a host every region reaches (ft.min_regions, ft.heartbeat_timeout_s
# and ft.join_timeout_s are its flags here):
#   torchft_lighthouse --min_replicas 1 --heartbeat_timeout_ms 5000 --join_timeout_ms 60000 --bind [::]:29510
# then, on region r's node (NPROC = topology.ranks_per_region; the lighthouse's address is the
# config's ft.lighthouse, else LIGHTHOUSE):
#   REGION=r LIGHTHOUSE=http://lighthouse-host:29510 NPROC=8 launch/ft-region.sh configs/gpu-150m.yaml [--set k=v ...]
# run.dir must be on a filesystem every node sees (metrics, summaries, each region's checkpoints).
set -euo pipefail
config=$1
shift
export COCODC_REGION="${REGION:?set REGION}"
if [ -n "${LIGHTHOUSE:-}" ]; then
    export TORCHFT_LIGHTHOUSE="$LIGHTHOUSE"
fi
# The rendezvous on this node's routable name: the other regions reach this region's store (and
# torchft's group through it) at the MASTER_ADDR torchrun derives from it.
exec torchrun --nnodes 1 --nproc-per-node "${NPROC:?set NPROC}" --max-restarts "${MAX_RESTARTS:-3}" \
    --rdzv-backend c10d --rdzv-endpoint "$(hostname -f):${PORT:-29400}" --rdzv-id "region${REGION}" \
    -m cocodc.train -c "$config" --set ft.enabled=true "$@"
