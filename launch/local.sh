#!/usr/bin/env bash
# N r1jax processes on this machine, D fake CPU devices each, joined on 127.0.0.1 with gloo
# collectives: how a multi-host layout is tried before a cluster is paid for. Usage:
#   launch/local.sh N D [COMMAND] [CONFIG] [key=value ...]     COMMAND: train (default), mesh, compile
#   launch/local.sh 4 2 mesh 'mesh.ici={fsdp: 2}' 'mesh.dcn={data: 4}'   a 4-node miniature of h800x512
#   launch/local.sh 2 4 train run.dir=runs/two-procs                      the demo on 2 processes
#   launch/local.sh 1 8 train                                             one process, 8 devices
# Each process's lines are prefixed [pI]; train also writes RUN_DIR/logs/process_I.log.
# R1JAX_HEARTBEAT_TIMEOUT=S (default 60): when a process dies the others stop within about S.
set -euo pipefail
n=${1:?usage: launch/local.sh N D [COMMAND] [CONFIG] [key=value ...]}
d=${2:?usage: launch/local.sh N D [COMMAND] [CONFIG] [key=value ...]}
shift 2
case "${1:-}" in
  train|mesh|compile) cmd=$1; shift ;;
  *) cmd=train ;;
esac
exec r1jax --processes "$n" --devices "$d" "$cmd" "$@"
