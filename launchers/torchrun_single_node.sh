#!/bin/bash
# One node, no scheduler: torchrun with elastic restarts, stop-and-resume on SIGTERM / SIGUSR1.
#
#   launchers/torchrun_single_node.sh --config configs/tiny_hybrid.json [--set k=v ...]
#   NPROC=4 MAX_RESTARTS=2 launchers/torchrun_single_node.sh --config C
#   DRY_RUN=1 launchers/torchrun_single_node.sh --config C      (or --dry-run: print, run nothing)
#
# NPROC defaults to the GPUs nvidia-smi lists (1 without one; CPU ranks use gloo). MAX_RESTARTS
# (default 0): how often torchrun restarts all ranks after one fails; they resume from the latest
# checkpoint. SIGTERM / SIGUSR1 to this script is forwarded to torchrun as SIGTERM: the trainer
# checkpoints and exits 0; rerun the same command to resume.

set -uo pipefail
MX_SCRIPT=torchrun_single_node.sh
export MEGAXATL_REPO=${MEGAXATL_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
source "$MEGAXATL_REPO/launchers/slurm/_common.sh"

mx_parse_args "$@"
mx_tools
if [[ -n "${NPROC:-}" ]]; then MX_GPUS=$NPROC; else SLURM_GPUS_ON_NODE="" SLURM_GPUS_PER_NODE="" mx_gpus; fi
MX_HOSTS=(127.0.0.1)
MAX_RESTARTS=${MAX_RESTARTS:-0}
unset SLURM_JOB_ID  # a plain run: the trap signals torchrun, not a SLURM job
mx_env

mx_layout 1 "$MX_GPUS"
mx_show_env
cd "$MX_REPO"
mx_launch "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$MX_GPUS" --max-restarts="$MAX_RESTARTS" \
    launchers/pretrain.py "${MX_ARGS[@]}"
