# Shared by launchers/slurm/*.sbatch and launchers/torchrun_single_node.sh (sourced, not run).
#
# What it provides (all names start with mx_ / MX_):
#   mx_parse_args "$@"   --dry-run (or DRY_RUN=1) -> MX_DRY_RUN=1; --config C -> MX_CONFIG;
#                        everything but --dry-run -> MX_ARGS (passed to launchers/pretrain.py)
#   mx_tools             MX_REPO, MX_PYTHON and the launcher binaries next to it
#   mx_hosts             MX_HOSTS (array) from SLURM_JOB_NODELIST: `scontrol show hostnames`, or
#                        megaxatl's own parser when scontrol is not on PATH
#   mx_gpus              MX_GPUS: GPUs per node (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, nvidia-smi)
#   mx_env               MASTER_ADDR / MASTER_PORT / OMP / NCCL environment (printed on a dry run)
#   mx_layout N G        prints and checks the TP x PP x DP layout (python -m megaxatl.cluster.layout)
#   mx_launch CMD...     runs CMD in the background and waits, with the preemption trap armed;
#                        on a dry run prints CMD instead
#
# Preemption and requeue: SLURM sends the batch shell SIGUSR1 some minutes before the time limit
# (`#SBATCH --signal=B:USR1@300`), or SIGTERM on preemption. The trap forwards SIGTERM to the
# training processes (`scancel --signal=TERM $SLURM_JOB_ID` signals every job step but not this
# shell; without SLURM it signals the launcher child), waits for them: the trainer finishes its
# step, writes a checkpoint and exits 0; then `scontrol requeue` puts the job back in the queue
# (`#SBATCH --requeue`), and the requeued job resumes from out_dir's `latest` by itself.
# Mind the launchers' own kill windows: DeepSpeed's launch.py and torchrun SIGKILL their ranks
# about 30 s after they forward SIGTERM, so a checkpoint that takes longer is cut short; the run
# then resumes from the previous periodic checkpoint (train.save_interval bounds the loss). The
# srun launcher (LAUNCHER=srun in pretrain.sbatch) has no such window (SLURM's KillWait applies).

MX_DRY_RUN=${DRY_RUN:-0}
MX_CONFIG=""
MX_ARGS=()
MX_CHILD=""
MX_PREEMPTED=0

mx_die() { echo "$(basename "${MX_SCRIPT:-$0}"): error: $*" >&2; exit 2; }

mx_parse_args() {
    while (($#)); do
        case "$1" in
            --dry-run) MX_DRY_RUN=1 ;;
            --config) MX_CONFIG="${2:-}"; MX_ARGS+=("$1" "${2:-}"); shift ;;
            --config=*) MX_CONFIG="${1#--config=}"; MX_ARGS+=("$1") ;;
            *) MX_ARGS+=("$1") ;;
        esac
        shift
    done
    [[ "$MX_DRY_RUN" == 0 || "$MX_DRY_RUN" == 1 ]] || MX_DRY_RUN=1
    [[ -n "$MX_CONFIG" ]] || mx_die "--config C is required (arguments after the script go to launchers/pretrain.py)"
}

mx_tools() {
    # sbatch copies the script to a spool folder: find the repo from the submit folder, not $0.
    MX_REPO=${MEGAXATL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f "$MX_REPO/launchers/pretrain.py" ]] || mx_die "$MX_REPO is not the megaxatl repo (set MEGAXATL_REPO)"
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$MX_REPO/.venv/bin/python" ]]; then PYTHON="$MX_REPO/.venv/bin/python"; else PYTHON=python3; fi
    fi
    MX_PYTHON=$PYTHON
    MX_BIN=$(dirname "$(command -v "$MX_PYTHON" || echo "$MX_PYTHON")")
    DEEPSPEED=${DEEPSPEED:-$MX_BIN/deepspeed}
    TORCHRUN=${TORCHRUN:-$MX_BIN/torchrun}
    [[ -f "$MX_CONFIG" || -f "$MX_REPO/$MX_CONFIG" ]] || mx_die "config $MX_CONFIG not found"
}

mx_hosts() {
    local list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [[ -n "$list" ]] || mx_die "SLURM_JOB_NODELIST is not set (submit with sbatch, or use launchers/torchrun_single_node.sh)"
    local out
    if command -v scontrol >/dev/null 2>&1; then
        out=$(scontrol show hostnames "$list") || mx_die "scontrol show hostnames '$list' failed"
    else
        out=$(cd "$MX_REPO" && "$MX_PYTHON" -m megaxatl.cluster.nodelist "$list") || mx_die "cannot parse node list '$list'"
    fi
    mapfile -t MX_HOSTS <<<"$out"
    [[ ${#MX_HOSTS[@]} -ge 1 && -n "${MX_HOSTS[0]}" ]] || mx_die "empty node list '$list'"
    if [[ -n "${SLURM_NNODES:-}" && "$SLURM_NNODES" != "${#MX_HOSTS[@]}" ]]; then
        mx_die "SLURM_NNODES=$SLURM_NNODES but the node list '$list' names ${#MX_HOSTS[@]} hosts"
    fi
}

mx_gpus() {
    local g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    g=${g##*:}  # "h100:8" -> 8
    if [[ -z "$g" ]] && command -v nvidia-smi >/dev/null 2>&1; then g=$(nvidia-smi -L | wc -l); fi
    [[ "${GPUS_PER_NODE:-}" ]] && g=$GPUS_PER_NODE
    [[ "$g" =~ ^[0-9]+$ && "$g" -ge 1 ]] || g=1
    MX_GPUS=$g
}

mx_env() {
    # Rendezvous: the first host; a port derived from the job id, so two jobs sharing a node differ.
    export MASTER_ADDR=${MASTER_ADDR:-${MX_HOSTS[0]:-127.0.0.1}}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    # CPU threads per rank: the node's cores over its ranks (the data loader has its own workers).
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / MX_GPUS > 0 ? cpus / MX_GPUS : 1 ))}
    # NCCL: report failures, not every ring. Async error handling turns a hung collective into an
    # error (the job exits, the requeue / torchrun restart resumes) instead of a silent hang.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Site-specific, set them in the environment when needed:
    #   NCCL_SOCKET_IFNAME=ib0|eth0   the interface for bootstrap / socket traffic
    #   NCCL_IB_HCA=mlx5              which InfiniBand adapters to use; NCCL_IB_DISABLE=1 without IB
    #   NCCL_NET_GDR_LEVEL, NCCL_P2P_LEVEL   GPUDirect RDMA / NVLink policy (defaults are usually right)
    #   CUDA_DEVICE_MAX_CONNECTIONS=1 needed by Megatron-style TP overlap, harmless otherwise
    export PYTHONUNBUFFERED=1
}

mx_layout() {  # nodes gpus_per_node
    local out
    out=$(cd "$MX_REPO" && "$MX_PYTHON" -m megaxatl.cluster.layout --config "$MX_CONFIG" --nodes "$1" --gpus-per-node "$2") \
        || mx_die "the layout does not fit (see above)"
    echo "$out"
}

mx_show_env() {
    echo "env: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG"
}

mx_forward() {  # the trap: $1 = the signal we got
    MX_PREEMPTED=1
    echo "$(date '+%F %T') got SIG$1: asking the trainer to checkpoint and stop" >&2
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scancel >/dev/null 2>&1; then
        scancel --signal=TERM "$SLURM_JOB_ID"  # every job step, not this shell
    elif [[ -n "$MX_CHILD" ]]; then
        kill -TERM "$MX_CHILD" 2>/dev/null
    fi
}

mx_launch() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    [[ "$MX_DRY_RUN" == 1 ]] && return 0
    trap 'mx_forward USR1' USR1
    trap 'mx_forward TERM' TERM
    "$@" &
    MX_CHILD=$!
    local rc=0
    # `wait` returns early (> 128) when a trapped signal arrives: keep waiting for the child.
    while true; do
        wait "$MX_CHILD"; rc=$?
        kill -0 "$MX_CHILD" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [[ "$MX_PREEMPTED" == 1 ]]; then
        if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
            echo "$(date '+%F %T') training stopped (exit $rc); requeueing job $SLURM_JOB_ID" >&2
            scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit to resume" >&2
        fi
        exit 0
    fi
    exit "$rc"
}
