#!/usr/bin/env bash
# One of these runs on every node of the job (srun starts one task per node; see slurm/common.sh). It starts
# `accelerate launch` for this node's processes and turns SIGUSR1 / SIGTERM into "finish the step, checkpoint, exit"
# for the training processes.
#
# Why not just `exec accelerate launch`: the launcher starts each training process in a session of its own, so a
# signal sent to this task does not reach them; the launcher itself dies on SIGUSR1 (its default action) and passes
# on only SIGTERM/SIGINT/SIGHUP/SIGQUIT, killing processes that are still busy 30 s later. So we keep the launcher
# out of it (it ignores SIGUSR1) and signal its children, the training processes, directly.
#
# Needs EF_NUM_MACHINES, EF_NUM_PROCESSES, EF_MAIN_ADDR, EF_MAIN_PORT, EF_ACCELERATE_CONFIG (set by common.sh);
# the machine rank is this node's SLURM_NODEID. DRY_RUN=1 prints the command instead of running it.
set -uo pipefail

: "${EF_NUM_MACHINES:?}" "${EF_NUM_PROCESSES:?}" "${EF_MAIN_ADDR:?}" "${EF_MAIN_PORT:?}" "${EF_ACCELERATE_CONFIG:?}"

cmd=(accelerate launch --config_file "$EF_ACCELERATE_CONFIG"
     --num_machines "$EF_NUM_MACHINES" --num_processes "$EF_NUM_PROCESSES" --machine_rank "${SLURM_NODEID:-0}"
     --main_process_ip "$EF_MAIN_ADDR" --main_process_port "$EF_MAIN_PORT" "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# The training processes inherit "ignore SIGUSR1" until the training loop installs its handler, so an early signal
# is ignored rather than killing a process that is still loading the model.
( trap '' USR1; exec "${cmd[@]}" ) &
launcher=$!
forwarded=0

forward_stop() {
  (( forwarded )) && return 0
  forwarded=1
  echo "[embedforge] node ${SLURM_NODEID:-0}: stop requested, the training processes will checkpoint and exit" >&2
  pkill -USR1 -P "$launcher" 2>/dev/null || true
}
trap forward_stop USR1 TERM INT

wait "$launcher"; rc=$?
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; rc=$?; done
exit "$rc"
