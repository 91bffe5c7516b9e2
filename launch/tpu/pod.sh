#!/usr/bin/env bash
# r1jax on a Cloud TPU pod slice (TPU VMs): one process per TPU VM host, driving all its chips.
# Run from your workstation with gcloud configured; the repository must be installed on every
# worker first (the `setup` action below). Usage:
#   launch/tpu/pod.sh NAME ZONE setup                 pip install this repository on every worker
#   launch/tpu/pod.sh NAME ZONE train CONFIG [key=value ...]
#   launch/tpu/pod.sh NAME ZONE mesh  CONFIG [key=value ...]
# e.g. one v5p-256 slice (128 chips, 32 hosts): R1-Zero's recipe with the slice's mesh
#   launch/tpu/pod.sh r1-v5p us-east5-a train configs/r1_zero.yaml 'mesh.ici={fsdp: 32, tensor: 4}' \
#       'mesh.dcn={data: 1}' model.path=/mnt/models/Qwen2.5-Math-7B data.path=/mnt/data/math.jsonl run.dir=/mnt/runs/r1
#
# Every worker gets its id and the worker list explicitly (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES),
# so r1jax starts jax.distributed with stated arguments: worker 0 is the coordinator (port
# 8482). EDIT: REPO (where the code is on the workers) and, for a TPU in another project, add
# --project. The mesh must match the slice: e.g. v5p-256 has 128 chips on 32 hosts of 4 chips.
set -euo pipefail
name=${1:?usage: launch/tpu/pod.sh NAME ZONE setup|train|mesh [CONFIG] [key=value ...]}
zone=${2:?usage: launch/tpu/pod.sh NAME ZONE setup|train|mesh [CONFIG] [key=value ...]}
action=${3:?usage: launch/tpu/pod.sh NAME ZONE setup|train|mesh [CONFIG] [key=value ...]}
shift 3
REPO=${REPO:-\$HOME/r1jax}     # EDIT: the repository's path on the workers
GIT_URL=${GIT_URL:-}           # EDIT for `setup`: where the workers clone the repository from

tpu=(gcloud compute tpus tpu-vm)
if [[ "$action" == setup ]]; then
  exec "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command \
    "set -e; [ -d $REPO ] || git clone ${GIT_URL:?set GIT_URL} $REPO; cd $REPO && pip install -e '.[tpu]'"
fi

# The workers' internal IPs in worker order: worker i is process i.
ips=$("${tpu[@]}" describe "$name" --zone "$zone" --format='value(networkEndpoints[].ipAddress)' | tr ';' ',')
n=$(awk -F, '{print NF}' <<<"$ips")
args=$(printf ' %q' "$@")
pids=()
for ((i = 0; i < n; i++)); do
  "${tpu[@]}" ssh "$name" --zone "$zone" --worker="$i" --command \
    "cd $REPO && TPU_WORKER_ID=$i TPU_WORKER_HOSTNAMES=$ips R1JAX_HEARTBEAT_TIMEOUT=\${R1JAX_HEARTBEAT_TIMEOUT:-120} r1jax $action$args" \
    2>&1 | sed -u "s/^/[w$i] /" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
