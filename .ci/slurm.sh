#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests of `undo iterate --launcher slurm`.
#
#   bash .ci/slurm.sh start     # installs slurm-wlm + munge if missing (Debian), starts munged, slurmctld, slurmd
#   bash .ci/slurm.sh stop      # stops exactly what `start` started (by pid), nothing else
#   bash .ci/slurm.sh status
#
# Runs as root. Every start gets its own ClusterName and spool directories (slurmctld refuses a state
# directory written under another ClusterName) and free ports; the node is 127.0.0.1 with 2 CPUs.
# State (pids, the spool root) is kept in $UNDO_SLURM_STATE (default /run/undo-slurm). Tests that need
# Slurm look for `sinfo` answering and skip with a reason otherwise.
set -euo pipefail

STATE=${UNDO_SLURM_STATE:-/run/undo-slurm}
CPUS=${UNDO_SLURM_CPUS:-2}
MEM=${UNDO_SLURM_MEM_MB:-20000}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for() {  # wait_for SECONDS CMD...: retry CMD until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "slurm.sh: timed out waiting for: $*" >&2; return 1; fi
    sleep 0.5
  done
}

start() {
  if [[ -f $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "slurm.sh: already running (state in $STATE)"; return 0
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$STATE"
  # munge: a key (1024 random bytes, owner munge, mode 400) and the daemon as user munge.
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    runuser -u munge -- munged --force
    wait_for 10 bash -c 'munge -n | unmunge'
    cat /run/munge/munged.pid >"$STATE/munged.pid"
  fi

  local cluster="undo$(date +%s)$$" host ctl_port d_port spool
  host=$(hostname -s)
  ctl_port=$(free_port); d_port=$(free_port)
  spool=/var/spool/undo-slurm/$cluster
  mkdir -p "$spool/ctld" "$spool/d" /etc/slurm
  echo "$spool" >"$STATE/spool"
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$spool/slurmctld.log
SlurmdLogFile=$spool/slurmd.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -i
  wait_for 20 scontrol ping
  slurmd
  wait_for 30 bash -c "sinfo -h -o %t | grep -qE '^(idle|mix|alloc)'"
  sinfo
}

stop() {
  for name in slurmd slurmctld munged; do
    local f=$STATE/$name.pid
    if [[ -f $f ]]; then
      local pid; pid=$(cat "$f")
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      fi
      rm -f "$f"
    fi
  done
  if [[ -f $STATE/spool ]]; then rm -rf "$(cat "$STATE/spool")"; rm -f "$STATE/spool"; fi
  echo "slurm.sh: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
