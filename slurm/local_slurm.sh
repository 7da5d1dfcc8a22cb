#!/usr/bin/env bash
# A local Slurm on this machine, to try the sbatch templates on a workstation and to test them in CI (.ci/run).
#
#   sudo slurm/local_slurm.sh start     # installs Debian's slurmd, slurmctld, slurm-client, munge if missing; starts them
#   export SLURM_CONF=/tmp/embedforge-slurm/slurm.conf     # (start prints this line) then sbatch/squeue/scontrol work
#   sudo slurm/local_slurm.sh status
#   sudo slurm/local_slurm.sh stop      # cancels this cluster's jobs, stops the daemons it started
#   slurm/local_slurm.sh env            # prints the export line
#
# Everything lives in one state folder (EMBEDFORGE_SLURM_DIR, default /tmp/embedforge-slurm): its own munge key and
# socket, slurm.conf, Slurm state, spool folders, logs and pid files. It never touches /etc/slurm, /etc/munge or a
# Slurm/munge that the system runs already, and `stop` ends only the daemons whose pid files are in that folder.
# `start` is idempotent: daemons that are already running are kept.
#
# Nodes: by default this machine appears as TWO Slurm nodes that share its CPUs and memory (as `slurmd -C` measures
# them; each node gets half), so that the multi-node template can be tried with two real srun tasks, node ranks 0 and
# 1. EMBEDFORGE_SLURM_NODES=1 makes it one node with all of them (a machine with one CPU always gets one node).
#
# Needs root: the daemons run as root (SlurmUser=root) so that jobs can run as the submitting user, and installing
# needs apt-get. Exit status 3 means "Slurm cannot run here" (not root, or not installed and no apt-get or package
# registry); any other non-zero status is a real failure.
#
# Knobs: EMBEDFORGE_SLURM_DIR, EMBEDFORGE_SLURM_NODES (2 or 1), SLURMCTLD_PORT (default 6817), SLURMD_PORT (default
# 6818; the second node listens on the next port).
set -euo pipefail

STATE="${EMBEDFORGE_SLURM_DIR:-/tmp/embedforge-slurm}"
NODES="${EMBEDFORGE_SLURM_NODES:-2}"
CTLD_PORT="${SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${SLURMD_PORT:-6818}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
PACKAGES=(slurmd slurmctld slurm-client munge)
APT_LOG=/tmp/embedforge-slurm-apt.log
CANNOT_RUN=3
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "[local_slurm] $*" >&2; }
die() { log "error: $*"; exit 1; }
cannot_run() { log "cannot run Slurm here: $*"; exit "$CANNOT_RUN"; }

installed() {
  local c
  for c in slurmctld slurmd sbatch scontrol munged mungekey; do
    command -v "$c" >/dev/null 2>&1 || return 1
  done
}

install_packages() {
  installed && return 0
  (( EUID == 0 )) || cannot_run "Slurm is not installed and installing it needs root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null 2>&1 || cannot_run "Slurm is not installed and there is no apt-get (install ${PACKAGES[*]} yourself)"
  log "installing ${PACKAGES[*]} (Debian packages; log: $APT_LOG)"
  # The packages would start system-wide daemons with their default configuration; keep those stopped (we run our
  # own). A policy-rc.d that we create is removed again.
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
    >"$APT_LOG" 2>&1 || rc=$?
  (( made_policy )) && rm -f "$policy"
  if (( rc != 0 )); then
    tail -n 5 "$APT_LOG" >&2
    cannot_run "apt-get could not install ${PACKAGES[*]} (no package registry?); see $APT_LOG"
  fi
  installed || die "installed ${PACKAGES[*]} but the Slurm/munge commands are still missing"
}

pid_alive() {  # pid_alive PIDFILE NAME: the process in PIDFILE runs and is NAME
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2"* ]]
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$(( SECONDS + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || return 1
    sleep 0.2
  done
}

munge_works() { munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null; }

start_munge() {
  if pid_alive "$MUNGE_DIR/munged.pid" munged && munge_works 2>/dev/null; then
    return 0
  fi
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 0711 "$MUNGE_DIR"   # clients must reach the socket; the key file itself is 0600
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    && wait_for 20 munge_works || { tail -n 3 "$MUNGE_DIR/munged.log" >&2; die "munged did not start"; }
  log "munged started (socket $MUNGE_SOCKET)"
}

node_lines() {  # node_lines HOST: the NodeName lines, this machine as NODES nodes sharing its CPUs and memory
  local host="$1" measured cpus mem n i name
  measured="$(slurmd -C | head -n 1)"
  [[ "$measured" == NodeName=* ]] || die "slurmd -C gave no node description: $measured"
  cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$measured")"
  mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$measured")"
  n="$NODES"
  if (( cpus < n )) || [[ "$host" == localhost ]]; then n=1; fi
  if (( n <= 1 )); then
    echo "${measured%% *} NodeHostname=$host NodeAddr=127.0.0.1 ${measured#* }"
    return
  fi
  # The second node is a second slurmd started with -N. Its name is "localhost" so that every node name resolves:
  # the templates use the first node's name as the rendezvous address, and a job may start on either node.
  for (( i = 0; i < n; i++ )); do
    name="$host"; (( i > 0 )) && name=localhost
    echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$(( SLURMD_PORT + i ))" \
         "CPUs=$(( cpus / n + (i < cpus % n ? 1 : 0) )) RealMemory=$(( mem / n ))"
  done
}

write_conf() {
  local host nodes
  host="$(hostname -s)"
  nodes="$(node_lines "$host")"
  mkdir -p "$STATE/ctld" "$STATE/log"
  cat > "$CONF.tmp" <<CONF
# Written by slurm/local_slurm.sh: a local Slurm for trying the Embedforge templates. Edits are overwritten.
ClusterName=embedforge-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobs.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
# No cgroups needed: processes are tracked by parent id, and tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# CPUs are what jobs reserve; memory is declared but not reserved per job, so small jobs share a node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
$nodes
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  mv "$CONF.tmp" "$CONF"
}

conf_nodes() { sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF"; }

nodes_ready() {  # every node up (idle, or already running jobs)
  local states
  states="$(sinfo -h -N -o %t 2>/dev/null)" || return 1
  [[ -n "$states" ]] && ! grep -qvE '^(idle|mix|alloc)$' <<<"$states"
}

start() {
  (( EUID == 0 )) || cannot_run "the local Slurm runs its daemons as root; run this as root (sudo)"
  install_packages
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  start_munge
  export SLURM_CONF="$CONF"
  if ! pid_alive "$STATE/slurmctld.pid" slurmctld; then
    write_conf
    # -i: start even if the state saved by an earlier run does not fit the new configuration.
    slurmctld -i -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    wait_for 30 scontrol ping || { tail -n 5 "$STATE/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
    log "slurmctld started"
  fi
  local node
  for node in $(conf_nodes); do
    pid_alive "$STATE/slurmd-$node.pid" slurmd && continue
    slurmd -N "$node" -f "$CONF" || die "slurmd for node $node did not start; see $STATE/log/slurmd-$node.log"
    log "slurmd started for node $node"
  done
  if ! wait_for 60 nodes_ready; then
    # Nodes that an earlier unclean stop left down are brought back once.
    scontrol update NodeName="$(conf_nodes | paste -sd,)" State=RESUME >/dev/null 2>&1 || true
    wait_for 30 nodes_ready || { sinfo -N -l >&2; die "the nodes are not ready; see $STATE/log/"; }
  fi
  log "ready: $(sinfo -h -N -o '%N (%c CPUs, %m MB) %t' | paste -sd' ')"
  echo "export SLURM_CONF=$CONF"
}

stop_daemon() {  # stop_daemon PIDFILE NAME
  local pid deadline
  pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || true
  deadline=$(( SECONDS + 20 ))
  while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$1"
  log "stopped $2 (pid $pid)"
}

stop() {
  export SLURM_CONF="$CONF"
  if pid_alive "$STATE/slurmctld.pid" slurmctld; then
    local jobs
    jobs="$(squeue -h -o %A 2>/dev/null | paste -sd' ')"
    if [[ -n "$jobs" ]]; then
      log "cancelling this cluster's jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_for 60 bash -c '[[ -z "$(squeue -h -o %A)" ]]' || log "some jobs did not end within 60 s"
    fi
  fi
  local f
  for f in "$STATE"/slurmd-*.pid; do
    [[ -e "$f" ]] && stop_daemon "$f" slurmd
  done
  stop_daemon "$STATE/slurmctld.pid" slurmctld
  stop_daemon "$MUNGE_DIR/munged.pid" munged
  return 0
}

status() {
  export SLURM_CONF="$CONF"
  local rc=0 node
  if pid_alive "$MUNGE_DIR/munged.pid" munged; then echo "munged: running"; else echo "munged: not running"; rc=1; fi
  if pid_alive "$STATE/slurmctld.pid" slurmctld; then echo "slurmctld: running"; else echo "slurmctld: not running"; rc=1; fi
  if [[ -e "$CONF" ]]; then
    for node in $(conf_nodes); do
      if pid_alive "$STATE/slurmd-$node.pid" slurmd; then echo "slurmd $node: running"
      else echo "slurmd $node: not running"; rc=1; fi
    done
  fi
  if (( rc == 0 )); then sinfo -N -o '%N %c %m %t'; squeue; fi
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state folder: $STATE)" >&2; exit 2 ;;
esac
