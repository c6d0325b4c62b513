#!/usr/bin/env bash
# A single-node SLURM on this machine, for the tests and for trying job submission without a cluster.
#
#   tools/local_slurm.sh install          # Debian's slurmctld, slurmd, slurm-client and munge (root, apt)
#   tools/local_slurm.sh start DIR        # config, state and logs under DIR; prints the SLURM_CONF to export
#   tools/local_slurm.sh stop DIR         # stops what `start DIR` started and removes DIR's state
#
# The node is localhost (127.0.0.1) with the CPUs `slurmd -C` reports, one partition `debug`, no
# cgroups (they need systemd): processes are tracked by linuxproc. Clients find the cluster through
# SLURM_CONF=DIR/slurm.conf. munged is shared by every cluster on the machine: it is started if not
# running, and stopped by `stop` only when this script started it.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    echo "slurm and munge already installed"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "installing slurm needs root (apt-get install slurmctld slurmd slurm-client munge)"
  command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge with your package manager"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  local dir="$1"
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is running already
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$dir/started-munged"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
  local dir="$1" cpus
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)"
  [ -n "$cpus" ] || cpus=1
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/run" "$dir/log"
  cat >"$dir/slurm.conf.tmp" <<EOF
ClusterName=ratlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerParameters=defer
MinJobAge=600
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  mv "$dir/slurm.conf.tmp" "$dir/slurm.conf"
}

start() {
  local dir="$1"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  [ "$(id -u)" = 0 ] || die "starting the slurm daemons needs root"
  command -v slurmctld >/dev/null || die "slurm is not installed: run tools/local_slurm.sh install"
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    die "a cluster is already running from $dir (stop it first: tools/local_slurm.sh stop $dir)"
  fi
  start_munge "$dir"
  write_conf "$dir"
  slurmctld -f "$dir/slurm.conf" -i
  slurmd -f "$dir/slurm.conf" -N localhost
  export SLURM_CONF="$dir/slurm.conf"
  for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  sinfo >&2 || true
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  stop "$dir"
  die "the node did not become idle within 20 s (logs above)"
}

stop_pidfile() {
  local pidfile="$1" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop() {
  local dir="$1"
  [ -d "$dir" ] || return 0
  stop_pidfile "$dir/run/slurmd.pid"
  stop_pidfile "$dir/run/slurmctld.pid"
  # job processes that outlived slurmd (linuxproc tracking has no cgroup to kill)
  pkill -f "slurmstepd.*$dir" 2>/dev/null || true
  if [ -f "$dir/started-munged" ]; then
    pkill -u munge -x munged 2>/dev/null || true
    rm -f "$dir/started-munged"
  fi
  rm -rf "$dir/spool" "$dir/run"
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in
  -h|--help) usage ;;
  install) install_packages ;;
  start|stop)
    [ $# -eq 2 ] || die "$1 needs the cluster's folder: tools/local_slurm.sh $1 DIR"
    "$1" "$2" ;;
  *) usage >&2; die "unknown command '$1' (install, start DIR, stop DIR)" ;;
esac
