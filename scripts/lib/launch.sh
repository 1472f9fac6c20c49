# The common body of the run_*.sh launchers (source this file; do not run it).
# A launcher loads its env files with load_env_file, then calls
#   run_launcher NAME DEFAULT_NPROC "$@"
# Everything stays overridable from the environment, e.g.
#   NPROC_PER_NODE=4 SEED=42 NUM_LAYERS=10 ./run_skc_competition_8xh100.sh

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

print_launcher_usage() {
    cat <<USAGE
usage: $0 [--dry-run] [--script PATH]
  --dry-run   check the resolved config, the data, the tokenizer and the output
              folders with DRY_RUN=1 python train_gpt.py (no GPU needed); same as
              DRY_RUN=1 in the env. DRY_RUN=config checks the settings only (no data).
  --script PATH
              run PATH instead of train_gpt.py, e.g. the file that
              build_submission.py extract wrote (extract, run it, finalize).
Every setting is an environment variable; those already set win over the
env files. Launcher settings: NPROC_PER_NODE, OMP_NUM_THREADS, RUN_ID, SEED,
LOG_DIR, TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, PYTHON, TORCHRUN.
USAGE
}

parse_launcher_args() {
    TRAIN_SCRIPT=train_gpt.py
    while (( $# )); do
        case $1 in
            --dry-run) [[ ${DRY_RUN:-0} != 0 ]] || export DRY_RUN=1 ;;
            --script)
                [[ $# -ge 2 && -f $2 ]] || { echo "error: --script needs an existing file, got '${2:-}'" >&2; exit 2; }
                TRAIN_SCRIPT=$2; shift ;;
            -h|--help) print_launcher_usage; exit 0 ;;
            *) echo "error: unknown argument $1" >&2; print_launcher_usage >&2; exit 2 ;;
        esac
        shift
    done
}

# RUN_ID names the log (LOG_DIR/RUN_ID.txt) and the artifact; the seed is in it.
set_run_identity() {
    local name=$1
    export SEED=${SEED:-1337}
    export LOG_DIR=${LOG_DIR:-logs}
    export RUN_ID=${RUN_ID:-${name}_$(date +%Y%m%d_%H%M%S)_seed${SEED}}
}

# Processes per node, CPU threads per process, and NCCL failure handling: a
# rank that dies or hangs tears the job down instead of idling the other GPUs
# (the collective timeout itself is the trainer's init_process_group timeout).
set_distributed_env() {
    local default_nproc=$1 cores
    export NPROC_PER_NODE=${NPROC_PER_NODE:-$default_nproc}
    cores=$(nproc 2>/dev/null || echo 8)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1200}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}

# Stop before torchrun when the shards or the tokenizer are missing.
require_data() {
    local missing=()
    compgen -G "$DATA_PATH/fineweb_train_*.bin" >/dev/null || missing+=("train shards $DATA_PATH/fineweb_train_*.bin")
    compgen -G "$DATA_PATH/fineweb_val_*.bin" >/dev/null || missing+=("val shards $DATA_PATH/fineweb_val_*.bin")
    [[ -f $TOKENIZER_PATH ]] || missing+=("tokenizer $TOKENIZER_PATH")
    if (( ${#missing[@]} )); then
        printf 'error: missing %s\n' "${missing[@]}" >&2
        local variant
        variant=$(basename "$DATA_PATH")
        [[ $variant == fineweb10B_* ]] && variant=${variant#fineweb10B_} || variant="<sp1024|sp4096|sp8192>"
        cat >&2 <<HINT
Get the official FineWeb shards and tokenizer with
  python data/prepare.py download --variant $variant --train-shards 80
or point DATA_PATH / TOKENIZER_PATH at shards built with python data/prepare.py build.
HINT
        exit 1
    fi
}

print_launch_summary() {
    echo "launch: run_id=$RUN_ID seed=$SEED nproc_per_node=$NPROC_PER_NODE omp_threads=$OMP_NUM_THREADS" \
         "script=$TRAIN_SCRIPT data=$DATA_PATH tokenizer=$TOKENIZER_PATH log=$LOG_DIR/$RUN_ID.txt dry_run=${DRY_RUN:-0}"
}

run_launcher() {
    local name=$1 default_nproc=$2
    shift 2
    parse_launcher_args "$@"
    set_run_identity "$name"
    set_distributed_env "$default_nproc"
    print_launch_summary
    if [[ ${DRY_RUN:-0} != 0 ]]; then
        WORLD_SIZE=$NPROC_PER_NODE "${PYTHON:-python}" "$TRAIN_SCRIPT"
        return
    fi
    require_data
    mkdir -p "$LOG_DIR"
    set -o pipefail
    # A resumed run (RESUME_FROM set) appends to its console log, as the trainer does to its log.
    "${TORCHRUN:-torchrun}" --standalone --nproc_per_node="$NPROC_PER_NODE" "$TRAIN_SCRIPT" 2>&1 \
        | tee ${RESUME_FROM:+-a} "$LOG_DIR/$RUN_ID.console.log"
}
