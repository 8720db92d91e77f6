#!/usr/bin/env bash
# Run a torchrun job across regions emulated on this host: one network namespace per region,
# joined by links of the given one-way delay and rate, one torchrun node per namespace. Needs root.
#
#   launch/netem.sh REGIONS LATENCY_MS BANDWIDTH_MBPS -- -m cocodc.train -c configs/tiny.yaml [--set k=v ...]
#   launch/netem.sh 3 100 100 -- my_train.py --my-args          # any torchrun script
#
# NPROC (default 1) ranks per region, JITTER_MS and LOSS_PCT (default 0) shape the links further.
# `cocodc train` does all this itself with `--set wan.emulation=netem`; this script is for your own
# training scripts, and shows the torchrun flags that work inside namespaces.
set -euo pipefail
if [[ $# -lt 5 || $4 != "--" ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
regions=$1 latency=$2 bandwidth=$3
shift 4
name="n$$"
python3 -m cocodc.cli netem up --name "$name" --regions "$regions" --latency-ms "$latency" \
    --bandwidth-mbps "$bandwidth" --jitter-ms "${JITTER_MS:-0}" --loss-pct "${LOSS_PCT:-0}"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    python3 -m cocodc.cli netem down --name "$name" >/dev/null
}
trap cleanup EXIT

# The rendezvous store runs apart from the torchrun agents, in region 0: an agent that hosted it
# would exit first and leave the others failing their shutdown.
host=10.77.0.100
ip netns exec "$name-r0" python3 -c "
import signal
from torch.distributed import TCPStore
store = TCPStore('$host', 29400, is_master=True, wait_for_workers=False)
signal.pause()" &
pids+=($!)

export GLOO_SOCKET_IFNAME=wan0  # the WAN interface inside every namespace
export TORCH_CPP_LOG_LEVEL=${TORCH_CPP_LOG_LEVEL:-ERROR}  # else c10d warns that peers' hostnames do not resolve
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / (regions * ${NPROC:-1}) > 0 ? $(nproc) / (regions * ${NPROC:-1}) : 1 ))}
nodes=()
for ((m = 0; m < regions; m++)); do
    # Region m's address is 10.77.0.(100+m); c10d ranks nodes by address, so node m is region m.
    ip netns exec "$name-r$m" python3 -m torch.distributed.run --nnodes "$regions" --nproc-per-node "${NPROC:-1}" \
        --rdzv-backend c10d --rdzv-endpoint "$host:29400" --rdzv-id "$name" --rdzv-conf is_host=false \
        --local-addr "10.77.0.$((100 + m))" "$@" &
    nodes+=($!)
done
status=0
for node in "${nodes[@]}"; do
    wait "$node" || status=$?
done
exit "$status"
