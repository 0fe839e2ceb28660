#!/usr/bin/env bash
# tools/local-slurm.sh: a real SLURM cluster on Debian/Ubuntu, as root, without systemd: one node, or
# N nodes on this one machine, each in its own network namespace.
#
#   tools/local-slurm.sh up [--no-accounting] [--nodes N]  # install (apt) if needed, configure, start, wait for the nodes
#   tools/local-slurm.sh status [--nodes N]                # daemons, sinfo, squeue
#   tools/local-slurm.sh down [--nodes N]                  # cancel jobs, stop the daemons it started (by recorded pid)
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
#
# --nodes N (2..16): a second, independent cluster that runs beside the single-node one (so both can be
# up at once): its own state dir ($EMAE_SLURM_MULTI_STATE, default /var/lib/emae-local-slurm-multi),
# config ($STATE/etc/slurm.conf: clients reach it with SLURM_CONF=that file; `status --nodes 2` prints
# it), munged (own socket, the machine's key), MariaDB + slurmdbd (port 6829), slurmctld on the host
# (port 6827) and N slurmd, node i in network namespace emae-n<i> with hostname emae-n<i> (unshare --uts),
# address $EMAE_SLURM_SUBNET.(10+i) (default subnet 10.217.0) on a veth pair onto bridge emae-br
# ($EMAE_SLURM_SUBNET.1, the controller's address), /etc/netns/emae-n<i>/hosts naming every node. What
# `up` creates (namespaces, links, hosts files) is recorded in $STATE/created and `down` removes exactly
# that. --nodes 1 (the default) is the single-node cluster; `down`/`status` take --nodes N (any N >= 2:
# the multi-node cluster) to choose which.
set -euo pipefail

SINGLE_STATE=${EMAE_SLURM_STATE:-/var/lib/emae-local-slurm}
MULTI_STATE=${EMAE_SLURM_MULTI_STATE:-/var/lib/emae-local-slurm-multi}
UP_TIMEOUT=${EMAE_SLURM_UP_TIMEOUT:-120}
ACCOUNT=${EMAE_SLURM_ACCOUNT:-emae}
MARKER="# managed by emae tools/local-slurm.sh"
SUBNET=${EMAE_SLURM_SUBNET:-10.217.0}  # the multi-node cluster's /24: bridge .1, node i .(10+i)
BRIDGE=emae-br
NODE_PREFIX=emae-n
MULTI_CTLD_PORT=6827  # beside the single-node cluster's 6817 (slurmctld) and 6819 (slurmdbd)
MULTI_DBD_PORT=6829
MAX_NODES=16

# select_instance NODES: the paths of the single-node (1) or the multi-node (>= 2) cluster
select_instance() {
  NODES=$1
  if ((NODES == 1)); then
    MULTI=0
    STATE=$SINGLE_STATE
    CONF_DIR=/etc/slurm
    CLUSTER=${EMAE_SLURM_CLUSTER:-emae}
    MUNGE_SOCK=""  # the machine's munged (/run/munge)
  else
    MULTI=1
    STATE=$MULTI_STATE
    CONF_DIR=$STATE/etc
    CLUSTER=${EMAE_SLURM_CLUSTER:-emae}_multi
    MUNGE_SOCK=$STATE/munge/munge.socket.2
    # every SLURM command of this script (and the daemons it starts) reads this cluster's config
    export SLURM_CONF=$CONF_DIR/slurm.conf
  fi
  RUN=$STATE/run
  LOG=$STATE/log
  MYSQL_DIR=$STATE/mysql
  MYSQL_RUN=$STATE/mysqld
  MYSQL_SOCK=$MYSQL_RUN/mysqld.sock
}

# node_names: the cluster's node names, one a line (multi-node: the recorded count when it is up)
node_names() {
  if ((MULTI == 0)); then hostname -s; return 0; fi
  local n i
  n=$(cat "$STATE/nodes" 2>/dev/null || echo "$NODES")
  for i in $(seq 1 "$n"); do echo "$NODE_PREFIX$i"; done
}

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

# start NAME LOGFILE CMD...: run CMD (a foreground daemon, possibly behind setsid/setpriv/env/ip netns
# exec) in the background and record its pid and executable (the daemon binary is NAME without an
# @node suffix, mariadb: mariadbd)
start() {
  local name=$1 logfile=$2
  shift 2
  local bin=${name%%@*}
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
munge_works() {
  local sock=()
  [[ -n $MUNGE_SOCK ]] && sock=(--socket="$MUNGE_SOCK")
  munge "${sock[@]}" -n 2>/dev/null | unmunge "${sock[@]}" >/dev/null 2>&1
}

create_munge_key() {
  [[ -s /etc/munge/munge.key ]] && return 0
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
}

# the multi-node cluster's own munged (the machine's key, its own socket): it does not depend on the
# single-node cluster's, or the machine's, munged staying up
start_own_munge() {
  if alive munged && munge_works; then return 0; fi
  create_munge_key
  local dir=${MUNGE_SOCK%/*}
  mkdir -p "$dir"
  chown munge:munge "$dir"
  chmod 755 "$dir"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  start munged "$LOG/munged.log" setpriv --reuid=munge --regid=munge --init-groups \
    munged -F --force --socket="$MUNGE_SOCK" --key-file=/etc/munge/munge.key \
    --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" --log-file="$LOG/munged.log"
  wait_for 20 munge munge_works || fail_up "munged did not come up"
}

start_munge() {
  if ((MULTI)); then start_own_munge; return 0; fi
  if alive munged && munge_works; then return 0; fi
  if munge_works; then
    say "using the munged already running on this machine (not started by this script)"
    return 0
  fi
  create_munge_key
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
  # the nodes of a multi-node cluster share this machine's memory (each has all its CPUs)
  real=$((mem * 9 / 10 / NODES))
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
  local acct_lines ctl_addr=127.0.0.1 daemon_lines node_lines slurmd_spool=$STATE/slurmd
  local node_layout
  node_layout="$(sed -e 's/^NodeName=[^ ]* //' -e 's/RealMemory=[0-9]*//' <<<"$layout") RealMemory=$real Gres=gpu:1 State=UNKNOWN"
  if ((MULTI)); then
    # the controller on the host, reached from the nodes' namespaces at the bridge's address; one slurmd
    # a node (%n: its node name) in its own namespace, so each has the default slurmd port to itself
    ctl_addr=$SUBNET.1
    slurmd_spool=$STATE/slurmd/%n
    daemon_lines="SlurmctldPort=$MULTI_CTLD_PORT
AuthInfo=socket=$MUNGE_SOCK
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmdLogFile=$LOG/slurmd-%n.log"
    local i
    node_lines=$(for i in $(seq 1 "$NODES"); do
      echo "NodeName=$NODE_PREFIX$i NodeHostname=$NODE_PREFIX$i NodeAddr=$SUBNET.$((10 + i)) $node_layout"
    done)
  else
    daemon_lines="SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmdLogFile=$LOG/slurmd.log"
    node_lines="NodeName=$host NodeAddr=127.0.0.1 $node_layout"
  fi
  if [[ $accounting == yes ]]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    # AccountingStoragePass: the munged socket of connections to slurmdbd (AuthInfo is not used for them)
    ((MULTI)) && acct_lines+=$'\n'"AccountingStoragePort=$MULTI_DBD_PORT"$'\n'"AccountingStoragePass=$MUNGE_SOCK"
  else
    acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER (mode: accounting=$accounting, nodes=$NODES); rewritten by \`up\`
ClusterName=$CLUSTER
SlurmctldHost=$host($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
$daemon_lines
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
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
  cat >"$CONF_DIR/gres.conf" <<EOF
$MARKER
# a fake GPU: scheduled and counted (CUDA_VISIBLE_DEVICES=0) but no device; without File= the node is INVALID
Name=gpu File=/dev/null
EOF
  if [[ $accounting == yes ]]; then
    local dbd_lines=""
    ((MULTI)) && dbd_lines="DbdPort=$MULTI_DBD_PORT
AuthInfo=socket=$MUNGE_SOCK"
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
$dbd_lines
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

# --------------------------------------------------------------------------------------- network
# The multi-node cluster's network: bridge $BRIDGE ($SUBNET.1, on the host: the controller's address)
# and, per node, namespace emae-n<i> holding one end (eth0, $SUBNET.(10+i)) of a veth pair whose
# other end (emae-n<i>h) is on the bridge. Each thing is recorded in $STATE/created as it is made.

record() { echo "$*" >>"$STATE/created"; }

link_exists() { ip link show "$1" >/dev/null 2>&1; }
netns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

hosts_file() {  # the /etc/hosts the processes of every node's namespace see (ip netns exec binds it too)
  local n i
  echo "$MARKER"
  echo "127.0.0.1 localhost"
  echo "$SUBNET.1 $(hostname -s)"
  n=$(cat "$STATE/nodes")
  for i in $(seq 1 "$n"); do echo "$SUBNET.$((10 + i)) $NODE_PREFIX$i"; done
}

net_up() {
  local node i=0 ns
  command -v ip >/dev/null || die "the multi-node cluster needs iproute2 (ip): apt-get install iproute2"
  command -v unshare >/dev/null || die "the multi-node cluster needs unshare (util-linux)"
  # refuse to take over what someone else made with our names
  link_exists "$BRIDGE" && die "a network link named $BRIDGE exists that this script did not record (see $STATE/created): remove it first (ip link del $BRIDGE)"
  for node in $(node_names); do
    netns_exists "$node" && die "a network namespace named $node exists that this script did not record: remove it first (ip netns del $node)"
    link_exists "${node}h" && die "a network link named ${node}h exists that this script did not record: remove it first (ip link del ${node}h)"
    [[ -e /etc/netns/$node ]] && die "/etc/netns/$node exists and was not made by this script: remove it first"
  done
  ip link add "$BRIDGE" type bridge
  record link "$BRIDGE"
  # bridged frames skip iptables (br_netfilter + a FORWARD DROP policy, e.g. Docker's, would drop them)
  ip link set "$BRIDGE" type bridge nf_call_iptables 0 nf_call_ip6tables 0 2>/dev/null || true
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for node in $(node_names); do
    i=$((i + 1))
    ns=$node
    ip netns add "$ns"
    record netns "$ns"
    ip link add "${node}h" type veth peer name eth0 netns "$ns"
    record link "${node}h"
    ip link set "${node}h" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    [[ -d /etc/netns ]] || { mkdir /etc/netns; record dir /etc/netns; }
    mkdir "/etc/netns/$ns"
    record dir "/etc/netns/$ns"
    hosts_file >"/etc/netns/$ns/hosts"
  done
  say "network: bridge $BRIDGE ($SUBNET.1), nodes $(node_names | tr '\n' ' ')in their namespaces"
}

# stop_netns_processes NS: what still runs in the namespace (job steps that outlived slurmd), by pid
stop_netns_processes() {
  local ns=$1 pids
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
  [[ -z ${pids// /} ]] && return 0
  say "stopping what still runs in namespace $ns (pids $pids)"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && return 0
    sleep 0.1
  done
  kill -KILL $(ip netns pids "$ns" 2>/dev/null) 2>/dev/null || true
}

# net_down: remove what net_up recorded, last made first
net_down() {
  [[ -f $STATE/created ]] || return 0
  local kind what
  while read -r kind what; do
    case $kind in
      netns) if netns_exists "$what"; then stop_netns_processes "$what"; ip netns del "$what" || true; fi ;;
      link) if link_exists "$what"; then ip link del "$what" || true; fi ;;
      dir) rm -f "$what/hosts"; rmdir "$what" 2>/dev/null || true ;;
    esac
  done < <(tac "$STATE/created")
  rm -f "$STATE/created"
  say "network removed (bridge $BRIDGE, namespaces and links of $(node_names | tr '\n' ' ' | sed 's/ $//'))"
}

# verify_down: nothing of the multi-node cluster is left (namespaces, links, hosts files, daemons)
verify_down() {
  local left=() node d
  link_exists "$BRIDGE" && left+=("link $BRIDGE")
  for node in $(node_names); do
    netns_exists "$node" && left+=("netns $node")
    link_exists "${node}h" && left+=("link ${node}h")
    [[ -e /etc/netns/$node ]] && left+=("/etc/netns/$node")
  done
  for d in munged mariadb slurmdbd slurmctld $(slurmd_daemons); do
    alive "$d" && left+=("$d (pid $(pid_of "$d"))")
  done
  ((${#left[@]} == 0)) || die "down left behind: ${left[*]}"
  say "nothing left: no namespace, link, hosts file or daemon of the $(cat "$STATE/nodes" 2>/dev/null || echo "$NODES")-node cluster"
}

# ------------------------------------------------------------------------------------------- node
# slurmd_daemons: the names the slurmd pids are recorded under (slurmd; slurmd@emae-n<i>)
slurmd_daemons() {
  if ((MULTI == 0)); then echo slurmd; return 0; fi
  local node
  for node in $(node_names); do echo "slurmd@$node"; done
}

start_slurmds() {
  if ((MULTI == 0)); then
    alive slurmd || start slurmd "$LOG/slurmd.log" slurmd -D
    return 0
  fi
  local node
  for node in $(node_names); do
    mkdir -p "$STATE/slurmd/$node"
    # its own network (nsenter), hostname (unshare --uts) and /etc/hosts (a bind mount in its own mount
    # namespace, which still receives the host's later mounts: slave propagation); the node's jobs see
    # all three. Not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup, and slurmd then refuses
    # to start. Every step execs, so the recorded pid becomes slurmd's.
    alive "slurmd@$node" || start "slurmd@$node" "$LOG/slurmd-$node.log" \
      nsenter --net="/run/netns/$node" -- unshare --uts --mount --propagation slave -- \
      sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -D -N "$1"' sh "$node"
  done
}

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n 1; }

wait_node_idle() {
  local deadline=$((SECONDS + UP_TIMEOUT)) state="" node waiting d
  local -A resumed=()
  while ((SECONDS < deadline)); do
    waiting=""
    for node in $(node_names); do
      state=$(node_state "$node" || true)
      case $state in
        idle | mixed | allocated | completing) continue ;;
        down* | drain* | fail*)
          # a node left down by an earlier run: resume it once (ReturnToService=2 usually does it)
          if [[ -z ${resumed[$node]:-} ]]; then
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
            resumed[$node]=1
          fi ;;
      esac
      waiting+="$node (${state:-none}) "
    done
    if [[ -z $waiting ]]; then
      for node in $(node_names); do say "node $node is $(node_state "$node")"; done
      return 0
    fi
    for d in slurmctld $(slurmd_daemons); do alive "$d" || fail_up "$d exited during start-up"; done
    sleep 0.5
  done
  fail_up "not every node became idle within ${UP_TIMEOUT}s (waiting for: ${waiting% }; sinfo: $(sinfo -N 2>&1 | tr '\n' ' '))"
}

# recorded_pids: every daemon pid recorded by either cluster (the single- and the multi-node one)
recorded_pids() { cat "$SINGLE_STATE"/run/*.pid "$MULTI_STATE"/run/*.pid 2>/dev/null || true; }

check_foreign() {
  local d pids ours
  ours=" $(recorded_pids | tr '\n' ' ') "
  if ((MULTI)); then
    # beside the single-node cluster, or a distribution's SLURM: only its own ports must be free
    local port
    for port in $MULTI_CTLD_PORT $MULTI_DBD_PORT; do
      if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "port $port (the multi-node cluster's $( ((port == MULTI_CTLD_PORT)) && echo slurmctld || echo slurmdbd)) is in use: $(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1)"
      fi
    done
    return 0
  fi
  for d in slurmctld slurmd slurmdbd; do
    alive "$d" && continue
    # read-only check (never used to signal anything); zombies and the other cluster's daemons do not count
    pids=$(ps -C "$d" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' | while read -r p; do
      [[ $ours == *" $p "* ]] || echo "$p"; done | tr '\n' ' ' || true)
    pids=${pids% }
    [[ -z $pids ]] || die "a $d this script did not start is running (pid $pids): stop it first (systemctl stop $d)"
  done
}

all_alive() {
  local d
  for d in slurmctld $(slurmd_daemons); do alive "$d" || return 1; done
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
  if all_alive; then
    local mode up_nodes
    mode=$(cat "$STATE/mode" 2>/dev/null || echo unknown)
    up_nodes=$(cat "$STATE/nodes" 2>/dev/null || echo 1)
    if [[ $mode == "$accounting" && $up_nodes == "$NODES" ]]; then
      say "already up (accounting=$mode, nodes=$up_nodes); nothing to do"
      wait_node_idle
      return 0
    fi
    say "up with accounting=$mode, nodes=$up_nodes; restarting with accounting=$accounting, nodes=$NODES"
    cmd_down
  elif ((MULTI)) && [[ -f $STATE/created ]]; then
    say "cleaning up after an earlier multi-node cluster that was not brought down"
    cmd_down
  fi
  check_foreign
  install_packages "$accounting"
  mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd" "$CONF_DIR"
  chmod 755 "$STATE"
  echo "$NODES" >"$STATE/nodes"
  write_conf "$accounting"
  ((MULTI)) && net_up
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
  start_slurmds
  wait_node_idle
  local ms=$((($(date +%s%N) - start_ns) / 1000000))
  say "up in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s (accounting=$accounting, nodes=$NODES, state $STATE)"
  ((MULTI)) && say "use it with: export SLURM_CONF=$SLURM_CONF"
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
  local d
  for d in $(slurmd_daemons); do stop "$d"; done
  stop slurmctld
  stop slurmdbd
  stop mariadb
  stop munged
  if ((MULTI)); then
    net_down
    verify_down
  fi
  say "down"
}

cmd_status() {
  local d any=0
  echo "state dir: $STATE (accounting=$(cat "$STATE/mode" 2>/dev/null || echo unknown), nodes=$(cat "$STATE/nodes" 2>/dev/null || echo "$NODES"))"
  ((MULTI)) && echo "config: SLURM_CONF=$SLURM_CONF"
  for d in munged mariadb slurmdbd slurmctld $(slurmd_daemons); do
    if alive "$d"; then echo "  $d: running (pid $(pid_of "$d"))"; any=1
    elif [[ -n $(pid_of "$d") ]]; then echo "  $d: DEAD (recorded pid $(pid_of "$d")); see $LOG/"; any=1
    else echo "  $d: not running"; fi
  done
  if ((MULTI)) && [[ -f $STATE/created ]]; then
    echo "  network: $(awk '{print $1 " " $2}' "$STATE/created" | tr '\n' ',' | sed 's/,$//; s/,/, /g')"
  fi
  if ((any)) && sinfo >/dev/null 2>&1; then
    sinfo -N -o '%N %T %C %m %G %P'
    squeue
    return 0
  fi
  echo "cluster is down"
  return 3
}

usage() { echo "usage: $0 up [--no-accounting] [--nodes N] | down [--nodes N] | status [--nodes N]" >&2; exit 2; }

# --nodes N may come anywhere after the command; it chooses the cluster (1: single-node, >= 2: multi-node)
command=${1:-}
[[ -n $command ]] || usage
shift
nodes=1
rest=()
while (($#)); do
  case $1 in
    --nodes) (($# >= 2)) || die "--nodes needs a number"; nodes=$2; shift 2 ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
[[ $nodes =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= MAX_NODES)) || die "--nodes $nodes: expected a whole number from 1 to $MAX_NODES"
select_instance "$nodes"
case $command in
  up) cmd_up "${rest[@]}" ;;
  down) ((${#rest[@]} == 0)) || die "unknown option for down: ${rest[*]}"; cmd_down ;;
  status) ((${#rest[@]} == 0)) || die "unknown option for status: ${rest[*]}"; cmd_status ;;
  *) usage ;;
esac
