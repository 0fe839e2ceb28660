#!/usr/bin/env bash
# tools/local-slurm.sh: a real single-node SLURM cluster on Debian/Ubuntu, as root, without systemd.
#
#   tools/local-slurm.sh up [--no-accounting]   # install (apt) if needed, configure, start, wait for the node
#   tools/local-slurm.sh status                 # daemons, sinfo, squeue
#   tools/local-slurm.sh down                   # cancel jobs, stop the daemons it started (by recorded pid)
#
# Daemons run in the foreground (-D / -F) started in the background; their pids are recorded under
# the state dir ($EMAE_SLURM_STATE, default /var/lib/emae-local-slurm) and `down` stops exactly those
# pids (never by process name). Logs: $STATE/log/*.log. Config: /etc/slurm/{slurm,gres,slurmdbd}.conf
# (rewritten by `up`; an existing slurm.conf not written by this script is left alone unless
# EMAE_SLURM_FORCE=1, which backs it up first).
#
# Node: the `slurmd -C` CPU layout, RealMemory 90% of it, one fake GPU (gres.conf File=/dev/null) so
# --gres=gpu:1 / --gpus-per-node=1 schedule (CUDA_VISIBLE_DEVICES=0, no real device). Partition `debug`
# (default), cores shareable by 2 jobs (OverSubscribe=FORCE:2).
# Accounting (default): MariaDB on a private unix socket (no TCP) + slurmdbd, so `sacct` works and
# reports gres/gpu in AllocTRES. --no-accounting: no slurmdbd; `sacct` then fails.
#
# Environment: EMAE_SLURM_STATE (state dir), EMAE_SLURM_UP_TIMEOUT (seconds to wait for the node,
# default 120), EMAE_SLURM_CLUSTER (cluster name, default emae), EMAE_SLURM_ACCOUNT (default emae),
# EMAE_SLURM_FORCE=1 (overwrite a foreign /etc/slurm/slurm.conf after backing it up).
set -euo pipefail

STATE=${EMAE_SLURM_STATE:-/var/lib/emae-local-slurm}
CONF_DIR=/etc/slurm
UP_TIMEOUT=${EMAE_SLURM_UP_TIMEOUT:-120}
CLUSTER=${EMAE_SLURM_CLUSTER:-emae}
ACCOUNT=${EMAE_SLURM_ACCOUNT:-emae}
MARKER="# managed by emae tools/local-slurm.sh"
RUN=$STATE/run
LOG=$STATE/log
MYSQL_DIR=$STATE/mysql
MYSQL_RUN=$STATE/mysqld
MYSQL_SOCK=$MYSQL_RUN/mysqld.sock

say() { printf 'local-slurm: %s\n' "$*"; }
die() { printf 'local-slurm: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------- pids
pid_of() { [[ -f $RUN/$1.pid ]] && cat "$RUN/$1.pid" || true; }

# running PID: the process exists and is not a zombie
running() {
  kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
  [[ -n $st && $st != Z && $st != X ]]
}

# alive NAME: the recorded pid exists and is still the program we started (guards against pid reuse)
alive() {
  local pid exe
  pid=$(pid_of "$1")
  [[ -n $pid ]] && running "$pid" || return 1
  exe=$(cat "$RUN/$1.exe" 2>/dev/null || true)
  [[ -z $exe ]] && return 0
  [[ $(readlink "/proc/$pid/exe" 2>/dev/null || true) == "$exe"* ]]
}

# start NAME LOGFILE CMD...: run CMD (a foreground daemon, possibly behind setsid/setpriv/env) in the
# background and record its pid and executable (the daemon binary is NAME, mariadb: mariadbd)
start() {
  local name=$1 logfile=$2
  shift 2
  local bin=$name
  [[ $name == mariadb ]] && bin=mariadbd
  local expected
  expected=$(readlink -f "$(command -v "$bin")")
  # setsid: own session, so that a Ctrl-C in the calling shell does not reach the daemons
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$RUN/$name.pid"
  echo "$expected" >"$RUN/$name.exe"
  # the pid is a shell, then setsid/setpriv/env, until it execs the daemon: wait for that
  for _ in $(seq 1 50); do
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null || true) == "$expected"* ]] && break
    running "$pid" || break
    sleep 0.1
  done
  say "started $name (pid $pid)"
}

# stop NAME: SIGTERM the recorded pid, wait up to 20 s, then SIGKILL
stop() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if [[ -z $pid ]]; then return 0; fi
  if alive "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    # wait for the process itself to be gone (its /proc/PID/exe disappears before it has exited)
    for _ in $(seq 1 200); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then
      say "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do
        running "$pid" || break
        sleep 0.1
      done
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$RUN/$name.pid" "$RUN/$name.exe"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.5 s
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.5
  done
  say "$what ready"
}

show_logs() {
  local f
  for f in "$LOG"/*.log; do
    [[ -f $f ]] || continue
    printf '\n----- %s (last 30 lines) -----\n' "$f" >&2
    tail -n 30 "$f" >&2 || true
  done
}

fail_up() {
  printf 'local-slurm: error: %s\n' "$*" >&2
  show_logs
  printf '\nlocal-slurm: daemons left running for inspection; stop them with: %s down\n' "$0" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------ install
need_root() { [[ $(id -u) == 0 ]] || die "must run as root (it installs packages, writes /etc/slurm, starts daemons)"; }

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client munge) missing=() p
  if [[ $1 == yes ]]; then pkgs+=(slurmdbd mariadb-server); fi
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
}

# --------------------------------------------------------------------------------------------- munge
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if alive munged && munge_works; then return 0; fi
  if munge_works; then
    say "using the munged already running on this machine (not started by this script)"
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  start munged "$LOG/munged.log" setpriv --reuid=munge --regid=munge --init-groups \
    munged -F --force --log-file="$LOG/munged.log"
  wait_for 20 munge munge_works || fail_up "munged did not come up"
}

# ------------------------------------------------------------------------------------------- mariadb
sql() { mariadb --no-defaults --socket="$MYSQL_SOCK" -uroot "$@"; }

start_mariadb() {
  if alive mariadb && sql -e 'select 1' >/dev/null 2>&1; then return 0; fi
  mkdir -p "$MYSQL_DIR" "$MYSQL_RUN"
  chown mysql:mysql "$MYSQL_DIR" "$MYSQL_RUN"
  if [[ ! -d $MYSQL_DIR/mysql ]]; then
    say "initialising MariaDB in $MYSQL_DIR"
    mariadb-install-db --no-defaults --datadir="$MYSQL_DIR" --user=mysql \
      --auth-root-authentication-method=socket --skip-test-db >>"$LOG/mariadb.log" 2>&1 \
      || fail_up "mariadb-install-db failed"
  fi
  # socket only (no TCP): nothing else on the machine can reach it, no password needed (root via unix_socket)
  start mariadb "$LOG/mariadb.log" mariadbd --no-defaults --datadir="$MYSQL_DIR" --socket="$MYSQL_SOCK" \
    --pid-file="$MYSQL_RUN/mysqld.pid" --skip-networking --user=mysql --log-error="$LOG/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=48M --innodb-lock-wait-timeout=900
  wait_for 60 mariadb sql -e 'select 1' || fail_up "MariaDB did not come up"
  sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db"
}

# ---------------------------------------------------------------------------------------------- conf
write_conf() {
  local accounting=$1 host layout mem cpus real defmem
  host=$(hostname -s)
  layout=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$layout")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$layout")
  [[ -n $cpus && -n $mem ]] || die "could not read the node layout from 'slurmd -C': $layout"
  real=$((mem * 9 / 10))
  # DefMemPerCPU: without it a job is given all the node's memory and blocks every other job.
  # Half a CPU's share: two jobs may share a core (OverSubscribe=FORCE:2) and still fit.
  defmem=$((real / cpus / 2))
  ((defmem > 4096)) && defmem=4096
  mkdir -p "$CONF_DIR"
  if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    if [[ ${EMAE_SLURM_FORCE:-0} == 1 ]]; then
      local backup
      backup=$CONF_DIR/slurm.conf.emae-backup.$(date +%s)
      cp -p "$CONF_DIR/slurm.conf" "$backup"
      say "backed up the existing $CONF_DIR/slurm.conf to $backup"
    else
      die "$CONF_DIR/slurm.conf exists and was not written by this script; set EMAE_SLURM_FORCE=1 to back it up and replace it"
    fi
  fi
  local acct_lines
  if [[ $accounting == yes ]]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER (mode: accounting=$accounting); rewritten by \`up\`
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups needed (containers, laptops without systemd)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# a node that was down comes back by itself once slurmd registers
ReturnToService=2
# finished jobs stay visible to squeue/scontrol for 5 min (status without accounting)
MinJobAge=300
# scancel / requeue: SIGKILL 5 s after SIGTERM (default 30)
KillWait=5
InactiveLimit=0
SchedulerParameters=bf_interval=5
GresTypes=gpu
$acct_lines
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 $(sed -e 's/^NodeName=[^ ]* //' -e 's/RealMemory=[0-9]*//' <<<"$layout") RealMemory=$real Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
  cat >"$CONF_DIR/gres.conf" <<EOF
$MARKER
# a fake GPU: scheduled and counted (CUDA_VISIBLE_DEVICES=0) but no device; without File= the node is INVALID
Name=gpu File=/dev/null
EOF
  if [[ $accounting == yes ]]; then
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
  fi
  # cgroup.conf is read by some plugins even when unused; an empty one silences the warning
  [[ -f $CONF_DIR/cgroup.conf ]] || echo "$MARKER" >"$CONF_DIR/cgroup.conf"
}

# ----------------------------------------------------------------------------------------- slurmdbd
start_slurmdbd() {
  # the MariaDB client library honours MYSQL_UNIX_PORT: slurmdbd reaches our private socket
  start slurmdbd "$LOG/slurmdbd.log" env MYSQL_UNIX_PORT="$MYSQL_SOCK" slurmdbd -D
  wait_for 60 slurmdbd sacctmgr -n show cluster || fail_up "slurmdbd did not answer sacctmgr"
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  if ! sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="emae local cluster" Organization=emae >/dev/null
  fi
  local u
  for u in root ${SUDO_USER:-}; do
    if ! sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" format=user | grep -qx "$u"; then
      sacctmgr -i add user "$u" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
    fi
  done
  say "cluster '$CLUSTER', account '$ACCOUNT' registered"
}

# ------------------------------------------------------------------------------------------- node
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

wait_node_idle() {
  local deadline=$((SECONDS + UP_TIMEOUT)) state="" resumed=0
  while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case $state in
      idle | mixed | allocated | completing) say "node $(hostname -s) is $state"; return 0 ;;
      down* | drain* | fail*)
        # a node left down by an earlier run: resume it once (ReturnToService=2 usually does it)
        if ((resumed == 0)) && alive slurmd; then
          scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    for d in slurmctld slurmd; do alive "$d" || fail_up "$d exited during start-up"; done
    sleep 0.5
  done
  fail_up "the node did not become idle within ${UP_TIMEOUT}s (last state: '${state:-none}'; sinfo: $(sinfo -N 2>&1 | tr '\n' ' '))"
}

check_foreign() {
  local d pids
  for d in slurmctld slurmd slurmdbd; do
    alive "$d" && continue
    # read-only check (never used to signal anything); zombies do not count
    pids=$(ps -C "$d" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' | tr '\n' ' ' || true)
    pids=${pids% }
    [[ -z $pids ]] || die "a $d this script did not start is running (pid $pids): stop it first (systemctl stop $d)"
  done
}

# ----------------------------------------------------------------------------------------- commands
cmd_up() {
  local accounting=yes
  for a in "$@"; do
    case $a in
      --no-accounting) accounting=no ;;
      *) die "unknown option for up: $a" ;;
    esac
  done
  need_root
  local t0=$SECONDS start_ns
  start_ns=$(date +%s%N)
  if alive slurmctld && alive slurmd; then
    local mode
    mode=$(cat "$STATE/mode" 2>/dev/null || echo unknown)
    if [[ $mode == "$accounting" ]]; then
      say "already up (accounting=$mode); nothing to do"
      wait_node_idle
      return 0
    fi
    say "up with accounting=$mode; restarting with accounting=$accounting"
    cmd_down
  fi
  check_foreign
  install_packages "$accounting"
  mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
  chmod 755 "$STATE"
  write_conf "$accounting"
  start_munge
  if [[ $accounting == yes ]]; then
    start_mariadb
    alive slurmdbd || start_slurmdbd
  else
    stop slurmdbd
    stop mariadb
  fi
  echo "$accounting" >"$STATE/mode"
  alive slurmctld || start slurmctld "$LOG/slurmctld.log" slurmctld -D
  wait_for 30 slurmctld scontrol ping || fail_up "slurmctld did not answer 'scontrol ping'"
  alive slurmd || start slurmd "$LOG/slurmd.log" slurmd -D
  wait_node_idle
  local ms=$((($(date +%s%N) - start_ns) / 1000000))
  say "up in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s (accounting=$accounting, state $STATE)"
  sinfo
}

cmd_down() {
  need_root
  if alive slurmctld; then
    # jobs outlive slurmd (slurmstepd): cancel them so that nothing is orphaned
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
      say "cancelling the jobs still queued or running"
      scancel --full $(squeue -h -o %i) 2>/dev/null || true
      for _ in $(seq 1 60); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.5
      done
    fi
  fi
  # slurmd last-but-one: its slurmstepds need slurmctld to report completion
  stop slurmd
  stop slurmctld
  stop slurmdbd
  stop mariadb
  stop munged
  say "down"
}

cmd_status() {
  local d any=0
  echo "state dir: $STATE (accounting=$(cat "$STATE/mode" 2>/dev/null || echo unknown))"
  for d in munged mariadb slurmdbd slurmctld slurmd; do
    if alive "$d"; then echo "  $d: running (pid $(pid_of "$d"))"; any=1
    elif [[ -n $(pid_of "$d") ]]; then echo "  $d: DEAD (recorded pid $(pid_of "$d")); see $LOG/$d.log"
    else echo "  $d: not running"; fi
  done
  if ((any)) && sinfo >/dev/null 2>&1; then
    sinfo -N -o '%N %T %C %m %G %P'
    squeue
    return 0
  fi
  echo "cluster is down"
  return 3
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [--no-accounting] | down | status" >&2; exit 2 ;;
esac
