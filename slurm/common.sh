# Shared body of the Embedforge sbatch templates (sourced, not run). See docs/cluster.md.
#
# ef_submit TRAIN_SCRIPT [ARGS...] works out the layout from the Slurm allocation (nodes, GPUs per node, node 0's
# address, a port), starts one `slurm/launch_node.sh` task per node with srun, and handles preemption:
#   Slurm sends SIGUSR1 to this batch shell (#SBATCH --signal=B:USR1@SECONDS) -> we pass it to srun, which passes it
#   to every node's task -> launch_node.sh passes it to the training processes -> they finish the current step, write
#   a checkpoint and exit (status 0) -> we `scontrol requeue` the job -> the next start resumes with
#   --resume_from_checkpoint latest. A training that fails instead of stopping cleanly is not requeued.
#
# Environment knobs (all optional):
#   DRY_RUN=1          print the srun and accelerate commands instead of running them (nothing is started)
#   ACCELERATE_CONFIG  accelerate config file (default: set by the template)
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, nvidia-smi, else 1)
#   MAIN_PORT          rendezvous port on node 0 (default: 20000 + job id % 20000, so jobs sharing a node differ)
#   MAX_REQUEUES       stop requeueing after this many restarts (default 50)
#   EMBEDFORGE_DIR     the repository (default: the folder sbatch was called from)

ef_log() { echo "[embedforge $(date '+%F %T')] $*" >&2; }

ef_gpus_per_node() {
  local n="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
  if [[ -z "$n" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    n="${SLURM_GPUS_PER_NODE%%(*}"   # '4', 'a100:4', 'gpu:a100:4(x2)'
    n="${n##*:}"
  fi
  if [[ -z "$n" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  fi
  [[ "$n" =~ ^[0-9]+$ ]] && (( n > 0 )) || n=1
  echo "$n"
}

ef_main_addr() {
  # The first host of the allocation runs process 0 and the rendezvous store.
  scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
}

ef_has_resume_flag() {
  local a
  for a in "$@"; do
    [[ "$a" == --resume_from_checkpoint || "$a" == --resume_from_checkpoint=* ]] && return 0
  done
  return 1
}

ef_submit() {
  if (( $# == 0 )); then
    ef_log "usage: sbatch $0 TRAIN_SCRIPT [ARGS...]   e.g. sbatch $0 train_textual_inversion.py --config run.yaml"
    return 2
  fi
  : "${SLURM_JOB_ID:?not inside a Slurm job (use DRY_RUN=1 with SLURM_* variables to try it)}"
  : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"

  local repo="${EMBEDFORGE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
  local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
  local gpus; gpus="$(ef_gpus_per_node)"
  local addr; addr="$(ef_main_addr)"
  [[ -n "$addr" ]] || { ef_log "scontrol gave no host for '$SLURM_JOB_NODELIST'"; return 1; }

  export EF_NUM_MACHINES="$nnodes"
  export EF_NUM_PROCESSES=$(( nnodes * gpus ))
  export EF_MAIN_ADDR="$addr"
  export EF_MAIN_PORT="${MAIN_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
  export EF_ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$repo/configs/accelerate/multi_node.yaml}"
  # One CPU thread budget per process: the task's CPUs split among the node's processes.
  local threads=$(( ${SLURM_CPUS_PER_TASK:-$gpus} / gpus ))
  (( threads > 0 )) || threads=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"

  local args=("$@")
  # Every start, first or requeued, resumes from the newest checkpoint if there is one ('latest' with none = fresh).
  ef_has_resume_flag "${args[@]}" || args+=(--resume_from_checkpoint latest)

  # One task per node holding all of the node's GPUs (a step gets all of the job's GPUs by default) and CPUs (newer
  # Slurm versions do not pass --cpus-per-task from sbatch on to srun by themselves).
  local srun_cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  srun_cmd+=(bash "$repo/slurm/launch_node.sh" "${args[@]}")
  ef_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $gpus process(es), main $EF_MAIN_ADDR:$EF_MAIN_PORT"
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${srun_cmd[@]}"; echo
    # What srun would start on this node (SLURM_NODEID picks the machine rank):
    DRY_RUN=1 bash "$repo/slurm/launch_node.sh" "${args[@]}"
    return 0
  fi

  cd "$repo" || return 1
  EF_PREEMPTED=0
  EF_OUTCOME=failed   # then done | stopped (signalled, checkpointed, not requeued) | requeued
  "${srun_cmd[@]}" &
  EF_SRUN_PID=$!
  trap ef_on_preempt USR1
  local rc
  wait "$EF_SRUN_PID"; rc=$?
  # A trapped signal interrupts `wait`; keep waiting until the training has really ended.
  while kill -0 "$EF_SRUN_PID" 2>/dev/null; do wait "$EF_SRUN_PID"; rc=$?; done
  trap - USR1
  ef_log "training step ended with status $rc"

  EF_OUTCOME=done
  (( rc == 0 )) || EF_OUTCOME=failed
  if (( EF_PREEMPTED )); then
    if (( rc != 0 )); then
      # The trainers did not stop cleanly (no checkpoint at the stop step): a real failure, which a restart would
      # only repeat. The job ends with the training's status instead.
      ef_log "not requeueing: the training failed (status $rc) instead of stopping at a checkpoint"
      return "$rc"
    fi
    EF_OUTCOME=stopped
    if (( ${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50} )); then
      ef_log "not requeueing: already restarted ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=${MAX_REQUEUES:-50});" \
        "submit the same command again to continue from the checkpoint"
      return "$rc"
    fi
    ef_log "requeueing job $SLURM_JOB_ID; it will resume from the newest checkpoint"
    EF_OUTCOME=requeued
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}

ef_on_preempt() {
  (( EF_PREEMPTED )) && return 0   # forward once
  EF_PREEMPTED=1
  ef_log "SIGUSR1 (time limit or preemption near): asking the trainers to checkpoint and stop"
  kill -USR1 "$EF_SRUN_PID" 2>/dev/null || true   # srun forwards it to the task on every node
}

# ef_array_task LIST TRAIN_SCRIPT [COMMON_ARGS...]: one job array task (slurm/train_array.sbatch). It trains the
# embedding on line SLURM_ARRAY_TASK_ID of LIST (its flags come after the common ones, so they win), through
# ef_submit (so preemption and requeue work as in the other templates), then records how it ended in the array's
# summary folder and rewrites the summary there (tools/job_array.py).
#   ARRAY_SUMMARY_DIR  the summary folder (default: embedforge-array-<array job id>/ in the folder sbatch was called from)
#   EMBEDDINGS_PER_TASK  with a --concepts file as LIST: its entries per task, trained as one batched run
ef_array_task() {
  if (( $# < 2 )); then
    ef_log "usage: sbatch --array=0-N $0 LIST TRAIN_SCRIPT [ARGS...]   (LIST: one line of flags per embedding)"
    return 2
  fi
  : "${SLURM_ARRAY_TASK_ID:?not a job array task (submit with sbatch --array=0-N, N+1 = lines in the list)}"
  local repo="${EMBEDFORGE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
  local list="$1" script="$2"; shift 2
  [[ "$list" == /* ]] || list="$PWD/$list"
  local summary="${ARRAY_SUMMARY_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/embedforge-array-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
  [[ "$summary" == /* ]] || summary="$PWD/$summary"
  local log; log="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1)"

  local picked; picked="$(mktemp)"
  (cd "$repo" && python -m tools.job_array args "$list" "$SLURM_ARRAY_TASK_ID" \
     ${EMBEDDINGS_PER_TASK:+--per_task "$EMBEDDINGS_PER_TASK"} -- "$@" > "$picked")
  local rc=$?
  local line=()
  (( rc == 0 )) && mapfile -d '' -t line < "$picked"
  rm -f "$picked"
  local cmd=("$script" "$@" "${line[@]}")
  if (( rc == 0 )); then
    ef_log "array task $SLURM_ARRAY_TASK_ID: $(printf '%q ' "${line[@]}")"
    ef_submit "${cmd[@]}"; rc=$?
  else
    EF_OUTCOME=failed
  fi
  # A requeued task records when it really ends; a dry run records nothing.
  [[ "${EF_OUTCOME:-}" == requeued || -n "${DRY_RUN:-}" ]] && return "$rc"
  (cd "$repo" && python -m tools.job_array record "$summary" --task "$SLURM_ARRAY_TASK_ID" \
     --tasks "${SLURM_ARRAY_TASK_COUNT:-0}" --job_id "$SLURM_JOB_ID" --outcome "$EF_OUTCOME" --status "$rc" \
     --restarts "${SLURM_RESTART_COUNT:-0}" --log "$log" -- "${cmd[@]}" >/dev/null) \
    && ef_log "summary: $summary/summary.txt" || ef_log "could not write the summary in $summary"
  return "$rc"
}
