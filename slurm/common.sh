#!/usr/bin/env bash
# Launch logic shared by the sbatch scripts in this directory: environment, rank layout, torchrun rendezvous,
# logs and checkpoints on shared storage, requeue before the time limit, and a dry-run mode.
#
# The sbatch scripts source this file, call sapo_setup, then sapo_start_job / sapo_check_plan /
# sapo_launch_torchrun (or sapo_step for single commands). srun runs this file once per node as
# `bash slurm/common.sh node -- PROGRAM ARGS...`, which builds that node's torchrun command and execs it.
#
# Environment (every variable is optional; the default is in brackets):
#   SAPO_ROOT          the repository checkout, on storage every node sees [$SLURM_SUBMIT_DIR, i.e. submit from
#                      the repository root; outside SLURM: the directory above this file]
#   SAPO_VENV          Python environment [$SAPO_ROOT/.venv]; its bin/ is put first on PATH
#   SAPO_ENV_SCRIPT    a file sourced first on every node: module loads, NCCL interface settings, ... [none]
#   SAPO_SHARED_DIR    shared storage for runs [$SAPO_ROOT]
#   SAPO_RUNS_DIR      run directories (logs, TensorBoard, checkpoints) [$SAPO_SHARED_DIR/runs]
#   SAPO_RUN_NAME      the run directory's name; the same name resumes the same run [the recipe's file name]
#   SAPO_MODEL_DIR     Hugging Face model directory, passed as model.hf_path [the recipe's]
#   SAPO_TRAIN_DATA    prompt file, passed as data.train [the recipe's]
#   SAPO_VAL_DATA      prompt file, passed as data.validation [the recipe's]
#   SAPO_OVERRIDES     extra dotted overrides, space separated [none]
#   SAPO_GPUS_PER_NODE GPUs (= ranks) per node [$SLURM_GPUS_ON_NODE, else 8]
#   SAPO_TRAIN_NODES   nodes that run the actor; the job's other nodes run only engines [all of them]
#   SAPO_MASTER_PORT   rendezvous port on the first node [20000 + SLURM_JOB_ID % 20000]
#   SAPO_SERVE_PORT    first port of the vLLM servers on rollout nodes [8000]
#   SAPO_RDZV_BACKEND  c10d (node ranks assigned at rendezvous) or static (node rank = SLURM_NODEID) [c10d]
#   SAPO_MAX_REQUEUES  stop requeueing after this many restarts [20]
#   SAPO_SKIP_PLAN=1   do not run `sapo-megatron plan` before the launch [0]
#   SAPO_DRY_RUN=1     print the rank layout and every node's torchrun command; start nothing [0]
#
# Relative paths in a recipe (models/..., data/...) resolve against SAPO_ROOT: every job runs from there.

# -- small helpers ---------------------------------------------------------------------------------------

sapo_log() {
    printf '[sapo %s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2
}

sapo_die() {
    sapo_log "error: $*"
    exit 1
}

sapo_dry_run() {
    [[ "${SAPO_DRY_RUN:-0}" == 1 ]]
}

# One host name per line for a SLURM node list ("gpu[01-04,07],login-a"). Uses scontrol when it is there;
# the fallback (dry runs, tests) handles comma lists with one bracket group per item, zero padding kept.
sapo_expand_nodelist() {
    local list=$1
    if ! sapo_dry_run && command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$list"
        return
    fi
    local -a items=()
    local item="" depth=0 ch i
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            "[") depth=$((depth + 1)); item+=$ch ;;
            "]") depth=$((depth - 1)); item+=$ch ;;
            ",") if ((depth == 0)); then items+=("$item"); item=""; else item+=$ch; fi ;;
            *) item+=$ch ;;
        esac
    done
    [[ -n $item ]] && items+=("$item")
    local prefix ranges suffix range lo hi width n
    local -a parts
    for item in "${items[@]}"; do
        if [[ $item =~ ^([^\[]*)\[([^]]*)\](.*)$ ]]; then
            prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
            IFS=, read -ra parts <<<"$ranges"
            for range in "${parts[@]}"; do
                if [[ $range =~ ^([0-9]+)-([0-9]+)$ ]]; then
                    lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]} width=${#BASH_REMATCH[1]}
                    for ((n = 10#$lo; n <= 10#$hi; n++)); do
                        printf '%s%0*d%s\n' "$prefix" "$width" "$n" "$suffix"
                    done
                else
                    printf '%s%s%s\n' "$prefix" "$range" "$suffix"
                fi
            done
        else
            printf '%s\n' "$item"
        fi
    done
}

# -- the job's environment -------------------------------------------------------------------------------

# Sets SAPO_ROOT, SAPO_NODES (array), SAPO_NNODES, SAPO_MASTER_ADDR/PORT, SAPO_GPUS_PER_NODE, SAPO_JOB_ID and
# the Python environment. Safe to call on the batch node and on every compute node.
sapo_setup() {
    if [[ -z "${SAPO_ROOT:-}" ]]; then
        if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/slurm/common.sh" ]]; then
            SAPO_ROOT=$SLURM_SUBMIT_DIR
        else
            SAPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        fi
    fi
    [[ -f "$SAPO_ROOT/slurm/common.sh" ]] ||
        sapo_die "SAPO_ROOT=$SAPO_ROOT is not the repository checkout: submit from the repository root or set SAPO_ROOT"
    export SAPO_ROOT
    cd "$SAPO_ROOT" || sapo_die "cannot cd to SAPO_ROOT=$SAPO_ROOT"
    if [[ -n "${SAPO_ENV_SCRIPT:-}" ]]; then
        # shellcheck disable=SC1090
        source "$SAPO_ENV_SCRIPT" || sapo_die "SAPO_ENV_SCRIPT=$SAPO_ENV_SCRIPT failed"
    fi
    export SAPO_VENV=${SAPO_VENV:-$SAPO_ROOT/.venv}
    if [[ -x "$SAPO_VENV/bin/python" ]]; then
        export PATH="$SAPO_VENV/bin:$PATH"
    elif ! sapo_dry_run; then
        sapo_die "no Python environment at SAPO_VENV=$SAPO_VENV (make env, or set SAPO_VENV)"
    fi
    export SAPO_PYTHON=${SAPO_PYTHON:-python}

    export SAPO_JOB_ID=${SLURM_JOB_ID:-dryrun}
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname)}}
    mapfile -t SAPO_NODES < <(sapo_expand_nodelist "$nodelist")
    SAPO_NNODES=${SLURM_NNODES:-${#SAPO_NODES[@]}}
    ((SAPO_NNODES == ${#SAPO_NODES[@]})) ||
        sapo_die "SLURM_NNODES=$SAPO_NNODES but the node list '$nodelist' names ${#SAPO_NODES[@]} node(s)"
    export SAPO_NNODES
    export SAPO_MASTER_ADDR=${SAPO_MASTER_ADDR:-${SAPO_NODES[0]}}
    # A port derived from the job id: two jobs sharing a first node do not collide, a requeued job keeps it.
    if [[ "$SAPO_JOB_ID" =~ ^[0-9]+$ ]]; then
        export SAPO_MASTER_PORT=${SAPO_MASTER_PORT:-$((20000 + SAPO_JOB_ID % 20000))}
    else
        export SAPO_MASTER_PORT=${SAPO_MASTER_PORT:-29500}
    fi
    export SAPO_GPUS_PER_NODE=${SAPO_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    # First port of the vLLM servers on rollout nodes (disaggregated jobs).
    export SAPO_SERVE_PORT=${SAPO_SERVE_PORT:-8000}
    export SAPO_RDZV_BACKEND=${SAPO_RDZV_BACKEND:-c10d}
    [[ $SAPO_RDZV_BACKEND == c10d || $SAPO_RDZV_BACKEND == static ]] ||
        sapo_die "SAPO_RDZV_BACKEND=$SAPO_RDZV_BACKEND: use c10d or static"

    # Offline cluster nodes: never reach for the model hub; one tokenizer thread per rank.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    export VLLM_NO_USAGE_STATS=${VLLM_NO_USAGE_STATS:-1}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PYTHONUNBUFFERED=1
    # megatron-core orders its tensor/sequence-parallel communication on one CUDA stream connection.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}

# The run directory of a recipe on shared storage; a requeued job gets the same one and resumes from it.
sapo_run_dir() {
    local recipe=$1
    local name=${SAPO_RUN_NAME:-$(basename "${recipe%.yaml}")}
    local shared=${SAPO_SHARED_DIR:-$SAPO_ROOT}
    echo "${SAPO_RUNS_DIR:-$shared/runs}/$name"
}

# The trainer's overrides that come from the environment: paths on shared storage and SAPO_OVERRIDES.
# Usage: sapo_path_overrides RUN_DIR -> one override per line.
sapo_path_overrides() {
    local run_dir=$1
    echo "trainer.run_dir=$run_dir"
    [[ -n "${SAPO_MODEL_DIR:-}" ]] && echo "model.hf_path=$SAPO_MODEL_DIR"
    [[ -n "${SAPO_TRAIN_DATA:-}" ]] && echo "data.train=$SAPO_TRAIN_DATA"
    [[ -n "${SAPO_VAL_DATA:-}" ]] && echo "data.validation=$SAPO_VAL_DATA"
    local extra
    for extra in ${SAPO_OVERRIDES:-}; do
        echo "$extra"
    done
}

# The step directory the checkpoint root's `latest` file names (actor/checkpoint.py writes it last).
# Usage: sapo_latest_checkpoint CKPT_ROOT -> e.g. step_000120
sapo_latest_checkpoint() {
    local root=$1
    if [[ -f "$root/latest" ]]; then
        tr -d '[:space:]' <"$root/latest"
        echo
    elif sapo_dry_run; then
        echo "step_LATEST"
    else
        sapo_die "no checkpoint under $root (no 'latest' file): set SAPO_CKPT_DIR / SAPO_CKPT_STEP"
    fi
}

# -- rank layout and torchrun ----------------------------------------------------------------------------

# Role of a node: the first SAPO_TRAIN_NODES nodes run the actor (colocated engines included), the rest
# only rollout engines (disaggregated jobs).
sapo_node_role() {
    local node_rank=$1
    if ((node_rank < ${SAPO_TRAIN_NODES:-$SAPO_NNODES})); then echo actor; else echo rollout; fi
}

sapo_print_layout() {
    local g=$SAPO_GPUS_PER_NODE i first train_nodes=${SAPO_TRAIN_NODES:-$SAPO_NNODES}
    echo "rank layout: ${train_nodes} actor node(s) x ${g} GPU(s) = $((train_nodes * g)) trainer ranks;" \
        "rendezvous ${SAPO_RDZV_BACKEND} at ${SAPO_MASTER_ADDR}:${SAPO_MASTER_PORT} (id ${SAPO_JOB_ID})"
    for ((i = 0; i < SAPO_NNODES; i++)); do
        first=$((i * g))
        if ((i < train_nodes)); then
            echo "  node_rank=$i host=${SAPO_NODES[i]} role=actor ranks=${first}-$((first + g - 1)) gpus=0-$((g - 1))"
        else
            echo "  node_rank=$i host=${SAPO_NODES[i]} role=rollout (vLLM servers from port ${SAPO_SERVE_PORT})" \
                "gpus=0-$((g - 1))"
        fi
    done
    if [[ $SAPO_RDZV_BACKEND == c10d ]]; then
        echo "  (c10d numbers the nodes at rendezvous: a node's role comes from SAPO_NODE_ROLE, not from its ranks)"
    fi
}

# The torchrun command of node NODE_RANK, one word per line, followed by PROGRAM ARGS (the trainer).
sapo_torchrun_command() {
    local node_rank=$1
    shift
    # The trainer's world is the actor's nodes only: rollout nodes run `sapo-megatron serve` instead.
    printf '%s\n' "$SAPO_PYTHON" -m torch.distributed.run \
        "--nnodes=${SAPO_TRAIN_NODES:-$SAPO_NNODES}" "--nproc-per-node=$SAPO_GPUS_PER_NODE" --max-restarts=0
    if [[ $SAPO_RDZV_BACKEND == c10d ]]; then
        printf '%s\n' --rdzv-backend=c10d "--rdzv-endpoint=$SAPO_MASTER_ADDR:$SAPO_MASTER_PORT" "--rdzv-id=$SAPO_JOB_ID"
    else
        printf '%s\n' "--node-rank=$node_rank" "--master-addr=$SAPO_MASTER_ADDR" "--master-port=$SAPO_MASTER_PORT"
    fi
    printf '%s\n' "$@"
}

# The rollout nodes' server URLs (one per engine), comma separated, as `sapo-megatron serve` binds them.
# Usage: sapo_server_urls ENGINE_TP
sapo_server_urls() {
    local tp=$1 i j urls=""
    local per_node=$((SAPO_GPUS_PER_NODE / tp))
    for ((i = ${SAPO_TRAIN_NODES:-$SAPO_NNODES}; i < SAPO_NNODES; i++)); do
        for ((j = 0; j < per_node; j++)); do
            urls+="${urls:+,}http://${SAPO_NODES[i]}:$((SAPO_SERVE_PORT + j))"
        done
    done
    echo "$urls"
}

# Runs on each rollout node (srun task): this node's vLLM servers until the job stops them.
sapo_serve_main() {
    sapo_setup
    local node_rank=${SLURM_NODEID:?sapo_serve_main runs under srun (SLURM_NODEID unset)}
    export SAPO_NODE_ROLE=rollout
    local -a command=("$SAPO_PYTHON" -m sapo_megatron.cli serve "$@" --host "$(hostname)" --base-port "$SAPO_SERVE_PORT")
    sapo_log "node_rank=$node_rank ($(hostname)) role=rollout: ${command[*]}"
    exec "${command[@]}"
}

# Starts the rollout servers on the rollout nodes (a background job step) and stops them when the job's shell
# exits. Usage: sapo_launch_servers RECIPE OVERRIDES...
sapo_launch_servers() {
    local first=${SAPO_TRAIN_NODES:-$SAPO_NNODES} i
    if sapo_dry_run; then
        for ((i = first; i < SAPO_NNODES; i++)); do
            echo "[dry-run] node_rank=$i host=${SAPO_NODES[i]}: SAPO_NODE_RANK=$i SAPO_NODE_ROLE=rollout $SAPO_PYTHON -m" \
                "sapo_megatron.cli serve $* --host ${SAPO_NODES[i]} --base-port $SAPO_SERVE_PORT"
        done
        return 0
    fi
    local hosts
    hosts=$(IFS=,; echo "${SAPO_NODES[*]:first}")
    srun --nodes=$((SAPO_NNODES - first)) --nodelist="$hosts" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        --cpu-bind=none bash "$SAPO_ROOT/slurm/common.sh" serve -- "$@" &
    SAPO_SERVERS_PID=$!
    trap 'kill "$SAPO_SERVERS_PID" 2>/dev/null || true' EXIT
    sapo_log "rollout servers starting on $hosts (job step pid $SAPO_SERVERS_PID); the trainer waits for them"
}

# Runs on each node (srun task): exports the node's identity and execs its torchrun.
sapo_node_main() {
    sapo_setup
    local node_rank=${SLURM_NODEID:?sapo_node_main runs under srun (SLURM_NODEID unset)}
    export SAPO_NODE_RANK=$node_rank
    SAPO_NODE_ROLE=$(sapo_node_role "$node_rank")
    export SAPO_NODE_ROLE
    local -a command
    mapfile -t command < <(sapo_torchrun_command "$node_rank" "$@")
    sapo_log "node_rank=$node_rank ($(hostname)) role=$SAPO_NODE_ROLE: ${command[*]}"
    exec "${command[@]}"
}

# -- requeue ---------------------------------------------------------------------------------------------

# `#SBATCH --signal=B:USR1@SECONDS` sends USR1 to the batch shell before the time limit. The job is then
# requeued: SLURM stops every step and starts the same job id again, which resumes from the run directory's
# newest complete checkpoint (the trainer does that by itself).
sapo_on_usr1() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= ${SAPO_MAX_REQUEUES:-20})); then
        sapo_log "time limit near; not requeueing: already restarted $restarts times (SAPO_MAX_REQUEUES)"
        # An explicit status: a bare `return` in a trap handler returns the interrupted `wait`'s (> 128),
        # which `set -e` would turn into the end of the job.
        return 0
    fi
    sapo_log "time limit near: requeueing job $SAPO_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SAPO_JOB_ID" || sapo_log "scontrol requeue failed; the job ends at its time limit"
    return 0
}

# Runs a command in the background and waits for it, so that the USR1 trap runs at once instead of after the
# command ends (bash defers traps while a foreground child runs).
sapo_run_interruptible() {
    trap sapo_on_usr1 USR1
    "$@" &
    local pid=$! rc
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; keep waiting while the child lives.
        if kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1
    return "$rc"
}

# -- entry points for the sbatch scripts -----------------------------------------------------------------

# Mirrors everything the job prints into LOG_FILE on shared storage as well as SLURM's output file.
sapo_log_to() {
    local log_file=$1
    mkdir -p "$(dirname "$log_file")"
    exec > >(tee -a "$log_file") 2>&1
}

# Starts the job's log on shared storage and says what runs where. Usage: sapo_start_job RUN_DIR
sapo_start_job() {
    local run_dir=$1
    if sapo_dry_run; then
        echo "[dry-run] run directory (logs, checkpoints): $run_dir"
        return 0
    fi
    mkdir -p "$run_dir/logs"
    sapo_log_to "$run_dir/logs/${SLURM_JOB_NAME:-sapo}-$SAPO_JOB_ID.log"
    sapo_log "job $SAPO_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SAPO_NODES[*]}; run directory $run_dir"
}

# Refuses a layout that does not divide the GPUs or does not fit their memory before any node starts.
# Usage: sapo_check_plan RECIPE OVERRIDES...
sapo_check_plan() {
    if sapo_dry_run; then
        echo "[dry-run] plan check: $SAPO_PYTHON -m sapo_megatron.cli plan $*"
        return 0
    fi
    [[ "${SAPO_SKIP_PLAN:-0}" == 1 ]] && return 0
    "$SAPO_PYTHON" -m sapo_megatron.cli plan "$@" ||
        sapo_die "sapo-megatron plan refused the layout (above); nothing was started"
}

# Starts PROGRAM ARGS under torchrun on every node of the job (one srun task per node).
# Usage: sapo_launch_torchrun -- PROGRAM ARGS...   (PROGRAM is torchrun's: a script, or --module NAME)
sapo_launch_torchrun() {
    [[ ${1:-} == -- ]] && shift
    sapo_print_layout
    local train_nodes=${SAPO_TRAIN_NODES:-$SAPO_NNODES}
    if sapo_dry_run; then
        local i
        local -a command
        for ((i = 0; i < train_nodes; i++)); do
            mapfile -t command < <(sapo_torchrun_command "$i" "$@")
            echo "[dry-run] node_rank=$i host=${SAPO_NODES[i]}:" \
                "SAPO_NODE_RANK=$i SAPO_NODE_ROLE=$(sapo_node_role "$i") ${command[*]}"
        done
        return 0
    fi
    local hosts
    hosts=$(IFS=,; echo "${SAPO_NODES[*]:0:train_nodes}")
    sapo_run_interruptible srun --nodes="$train_nodes" --ntasks="$train_nodes" --ntasks-per-node=1 \
        --nodelist="$hosts" --kill-on-bad-exit=1 --cpu-bind=none bash "$SAPO_ROOT/slurm/common.sh" node -- "$@"
}

# Runs one command as a job step (or prints it in a dry run), interruptible by the requeue signal.
sapo_step() {
    if sapo_dry_run; then
        echo "[dry-run] step: $*"
        return 0
    fi
    sapo_log "step: $*"
    sapo_run_interruptible "$@"
}

# `bash slurm/common.sh node -- PROGRAM ARGS...`: what srun runs on every node.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        node)
            shift
            [[ ${1:-} == -- ]] && shift
            sapo_node_main "$@"
            ;;
        serve)
            shift
            [[ ${1:-} == -- ]] && shift
            sapo_serve_main "$@"
            ;;
        *)
            echo "usage: bash slurm/common.sh node -- PROGRAM ARGS... | serve -- RECIPE OVERRIDES... (srun runs these)" >&2
            exit 2
            ;;
    esac
fi
