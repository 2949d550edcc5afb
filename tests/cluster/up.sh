#!/usr/bin/env bash
# Bring up (idempotently) a real single-host Slurm test cluster with accounting,
# PBS/Torque command wrappers, OpenMPI and two loopback sshds.
#
#   cluster name : hpcsl            partition : debug (default)
#   nodes        : n[1-4], 2 CPUs and 4000 MB each, slurmd ports 17001-17004
#   sshd         : 127.0.0.1:2222 and 127.0.0.1:2223 (second one for ProxyJump tests)
#   ssh key      : /root/.ssh/hpcsl_test_key (root and hpcsl accept it)
#   user         : hpcsl / hpcsl-test-pw (password login): the cluster account, home 0700
#   test client  : hpcs-dev, unprivileged, home 0700: scripts/test.sh runs the suite as this
#                  user (a scientist on the login node); it has copies of the ssh key, the
#                  known_hosts and ssh config in ~/.ssh, and may run only
#                  `sudo -n hpcsl-admin ...` (tests/cluster/admin.sh) as root
#
# Run as root on a Debian-like machine without systemd. Safe to run repeatedly:
# daemons that are up and whose configuration did not change are left alone.
set -euo pipefail

T0=$EPOCHREALTIME
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ $EUID -ne 0 ]]; then
    echo "up.sh: must run as root (it installs packages and starts system daemons)" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "up.sh: needs a Debian-like system (apt-get/dpkg not found)" >&2
    exit 2
fi

CLUSTER=hpcsl
PARTITION=debug
NODES=(n1 n2 n3 n4)
SSH_PORTS=(2222 2223)
TEST_USER=hpcsl
TEST_PASSWORD=hpcsl-test-pw
CLIENT_USER=hpcs-dev
KEY=/root/.ssh/hpcsl_test_key
KNOWN_HOSTS=/root/.ssh/hpcsl_known_hosts
SSH_CONFIG=/root/.ssh/hpcsl_ssh_config
STATE=/run/hpcsl               # pid files / ownership markers of what up.sh started
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=hpcsl-slurmdbd-pw
HOST=$(hostname)

elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[up %5ss] %s\n' "$(elapsed)" "$*"; }
die() { echo "up.sh: $*" >&2; exit 1; }

# wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.2 s until it succeeds
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what"
        sleep 0.2
    done
}

# pid_alive PIDFILE PATTERN : pid in file is alive and its command line matches PATTERN
pid_alive() {
    local f=$1 pat=$2 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq -- "$pat"
}

# stop_pidfile PIDFILE PATTERN : TERM the process (if it matches), wait up to 10 s, then KILL
stop_pidfile() {
    local f=$1 pat=$2 pid
    pid_alive "$f" "$pat" || { rm -f "$f"; return 0; }
    pid=$(tr -dc '0-9' <"$f")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

# one up.sh at a time (fd 9 is closed for every daemon started below)
mkdir -p /run/lock
exec 9>/run/lock/hpcsl-up.lock
flock -w 300 9 || die "another up.sh holds /run/lock/hpcsl-up.lock"

# ---------------------------------------------------------------- packages
PKGS=(slurm-wlm munge slurmdbd mariadb-server slurm-wlm-torque openssh-server
      openmpi-bin libopenmpi-dev sudo python3-venv python3-dev)
missing=()
for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $st == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # keep package scripts from starting services (no systemd here; we start them)
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/hpcsl-apt.log 2>&1 \
        || { tail -20 /tmp/hpcsl-apt.log >&2; die "apt-get install failed (log: /tmp/hpcsl-apt.log)"; }
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
fi
log "packages present"

mkdir -p "$STATE" /etc/slurm /var/log/slurm /var/spool/slurmctld /run/sshd /run/munge
for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd-$n" "/tmp/hpcsl-tmpfs-$n"; chmod 1777 "/tmp/hpcsl-tmpfs-$n"; done

# write_if_changed DEST MODE : stdin -> DEST; returns 0 when the file changed
write_if_changed() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"; chmod "$mode" "$dest"; return 1
    fi
    mv -f "$tmp" "$dest"
    return 0
}

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
chown munge:munge /run/munge 2>/dev/null || true
if ! pid_alive /run/munge/munged.pid munged || ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    stop_pidfile /run/munge/munged.pid munged
    munged --force >/dev/null 2>&1 9>&- || true
    wait_for 20 munged bash -c 'munge -n </dev/null | unmunge'
    touch "$STATE/munged.owned"
fi

# ---------------------------------------------------------------- mariadb
mysql_ok() { mysql -u root -e 'select 1' >/dev/null 2>&1; }
if ! mysql_ok && pid_alive "$STATE/mysqld_safe.pid" mysqld_safe; then
    # our mysqld_safe is alive: it restarts a crashed server by itself, give it time
    log "waiting for mysqld_safe to restart mariadb"
    for _ in $(seq 150); do mysql_ok && break; sleep 0.2; done
fi
if ! mysql_ok; then
    log "starting mariadb"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mysql_install_db --user=mysql >/dev/null 2>&1
    setsid nohup mysqld_safe </dev/null >/var/log/slurm/hpcsl-mysqld_safe.log 2>&1 9>&- &
    echo $! >"$STATE/mysqld_safe.pid"
    wait_for 60 mariadb mysql_ok
    touch "$STATE/mysqld.owned"
fi
mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL

# ---------------------------------------------------------------- slurm config
dbd_changed=0
if write_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF; then dbd_changed=1; fi
# generated by tests/cluster/up.sh -- do not edit
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

conf_changed=0
if write_if_changed /etc/slurm/slurm.conf 644 <<EOF; then conf_changed=1; fi
# generated by tests/cluster/up.sh -- do not edit
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
TmpFS=/tmp/hpcsl-tmpfs-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
TaskProlog=/etc/slurm/hpcsl-task-prolog.sh
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
MaxArraySize=1001
MaxJobCount=20000
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5,default_queue_depth=200,sched_min_interval=100000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
GresTypes=qpu
Licenses=aer:1,fake:1
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=4000 Gres=qpu:aer:1,qpu:fake:1 State=UNKNOWN
NodeName=n[2-4] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002-17004 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=$PARTITION Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP
EOF
# Two stand-in QPUs (issue 16), counted by Slurm two ways: typed gres on n1 (`qpu:aer`,
# `qpu:fake`, as IBM's QPU plugin names them) and cluster-wide licenses `aer` and `fake`.
# One device each (Count=1, no device file): Slurm lets one job at a time hold it.
if write_if_changed /etc/slurm/gres.conf 644 <<EOF; then conf_changed=1; fi
# generated by tests/cluster/up.sh -- do not edit
NodeName=n1 Name=qpu Type=aer Count=1
NodeName=n1 Name=qpu Type=fake Count=1
EOF
# Emulated nodes share one host, so Open MPI's shared-memory transport wrongly pairs
# ranks of different "nodes" and crashes; a real multi-node job would use the network.
# For jobs over several nodes, default Open MPI to self,tcp unless the job chose a btl.
write_if_changed /etc/slurm/hpcsl-task-prolog.sh 755 <<'EOF' || true
#!/bin/sh
# generated by tests/cluster/up.sh (TaskProlog: "export K=V" lines set task env)
if [ -z "${OMPI_MCA_btl:-}" ] && [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    echo "export OMPI_MCA_btl=self,tcp"
fi
EOF
# no cgroups in this sandbox; an explicit empty-ish cgroup.conf keeps slurmd quiet
write_if_changed /etc/slurm/cgroup.conf 644 <<EOF || true
# generated by tests/cluster/up.sh -- cgroups are not used (proctrack/linuxproc, task/none)
CgroupPlugin=autodetect
EOF
((conf_changed)) && log "slurm.conf (re)written"

# ---------------------------------------------------------------- slurmdbd
dbd_ok() { pid_alive /run/slurmdbd.pid slurmdbd; }
if ((dbd_changed)) || ! dbd_ok; then
    log "starting slurmdbd"
    stop_pidfile /run/slurmdbd.pid slurmdbd
    slurmdbd 9>&-
    wait_for 30 slurmdbd bash -c 'sacctmgr -n -P list cluster format=cluster'
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- slurmctld
if ((conf_changed)); then  # new config: stop all slurmd's (in parallel) before slurmctld
    stoppers=()
    for n in "${NODES[@]}"; do
        stop_pidfile "/run/slurmd-$n.pid" "slurmd .*-N $n( |$)" & stoppers+=($!)
    done
    wait "${stoppers[@]}"
fi
ctld_ok() { pid_alive /run/slurmctld.pid slurmctld && scontrol ping 2>/dev/null | grep -q 'is UP'; }
if ((conf_changed)) || ! ctld_ok; then
    log "starting slurmctld"
    stop_pidfile /run/slurmctld.pid slurmctld
    slurmctld 9>&-
    wait_for 30 slurmctld ctld_ok
fi

# ---------------------------------------------------------------- slurmd x4
for n in "${NODES[@]}"; do
    pf=/run/slurmd-$n.pid
    if ! pid_alive "$pf" "slurmd .*-N $n( |$)"; then
        log "starting slurmd $n"
        stop_pidfile "$pf" "slurmd .*-N $n( |$)"
        # foreground mode (-D) on purpose: a daemonized slurmd breaks srun steps here
        setsid nohup slurmd -D -N "$n" </dev/null >>"/var/log/slurm/slurmd-$n.out" 2>&1 9>&- &
        echo $! >"$pf"
    fi
done

nodes_ready() {
    local out
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -Ec ' (idle|mix|alloc|comp)$' <<<"$out") -eq ${#NODES[@]} ]]
}
end=$((SECONDS + 60))
until nodes_ready; do
    ((SECONDS < end)) || { sinfo -N >&2 || true; die "nodes did not become idle within 60s"; }
    # nodes left DOWN/DRAIN from an earlier run come back once their slurmd answers
    while read -r node state; do
        case $state in
            down|drain|drng|fail) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        esac
    done < <(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null || true)
    sleep 0.3
done
log "all ${#NODES[@]} nodes up"

# ---------------------------------------------------------------- ssh
ssh-keygen -A >/dev/null
if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$TEST_USER"
fi
# the cluster account's home is its own: the test client (another account) cannot read it,
# so a client that touches the cluster's files directly instead of through the agent fails
chmod 700 "$(getent passwd "$TEST_USER" | cut -d: -f6)"
echo "$TEST_USER:$TEST_PASSWORD" | chpasswd
mkdir -p /root/.ssh && chmod 700 /root/.ssh
[[ -s $KEY ]] || ssh-keygen -q -t ed25519 -N '' -C hpcsl-test -f "$KEY"
PUB=$(cut -d' ' -f1,2 "$KEY.pub")
add_key() {  # add_key HOME OWNER
    local ak=$1/.ssh/authorized_keys
    mkdir -p "$1/.ssh"; touch "$ak"
    grep -qF "$PUB" "$ak" || cat "$KEY.pub" >>"$ak"
    chmod 700 "$1/.ssh"; chmod 600 "$ak"; chown -R "$2:" "$1/.ssh"
}
add_key /root root
add_key "$(getent passwd "$TEST_USER" | cut -d: -f6)" "$TEST_USER"

sshd_changed=0
if write_if_changed /etc/ssh/hpcsl_sshd_config 644 <<EOF; then sshd_changed=1; fi
# generated by tests/cluster/up.sh: loopback-only sshd for tests (port given with -p)
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_rsa_key
HostKey /etc/ssh/ssh_host_ecdsa_key
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication yes
UsePAM yes
AuthorizedKeysFile .ssh/authorized_keys
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
MaxStartups 100:30:200
MaxSessions 50
LogLevel INFO
EOF
for port in "${SSH_PORTS[@]}"; do
    pf=$STATE/sshd-$port.pid
    if ((sshd_changed)) || ! pid_alive "$pf" "hpcsl_sshd_config -p $port "; then
        log "starting sshd on 127.0.0.1:$port"
        stop_pidfile "$pf" "hpcsl_sshd_config -p $port "
        /usr/sbin/sshd -t -f /etc/ssh/hpcsl_sshd_config || die "bad /etc/ssh/hpcsl_sshd_config"
        /usr/sbin/sshd -f /etc/ssh/hpcsl_sshd_config -p "$port" -o "PidFile=$pf" \
            -E "/var/log/slurm/hpcsl-sshd-$port.log" 9>&-
        wait_for 10 "sshd :$port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
    fi
done
# known_hosts for both ports, so clients may check host keys strictly if they want
{
    for port in "${SSH_PORTS[@]}"; do
        for k in /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub; do
            echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$k")"
            echo "[localhost]:$port $(cut -d' ' -f1,2 "$k")"
        done
    done
} | write_if_changed "$KNOWN_HOSTS" 644 || true
# OpenSSH client config with aliases (ssh -F $SSH_CONFIG hpcsl-via-jump ...); command
# line -o options do not reach a ProxyJump hop, a config file given with -F does
write_if_changed "$SSH_CONFIG" 644 <<EOF || true
# generated by tests/cluster/up.sh
Host hpcsl-login hpcsl-jump hpcsl-via-jump
    HostName 127.0.0.1
    User root
    IdentityFile $KEY
    IdentitiesOnly yes
    UserKnownHostsFile $KNOWN_HOSTS
    StrictHostKeyChecking yes
    BatchMode yes
Host hpcsl-login
    Port ${SSH_PORTS[0]}
Host hpcsl-jump
    Port ${SSH_PORTS[1]}
Host hpcsl-via-jump
    Port ${SSH_PORTS[0]}
    ProxyJump hpcsl-jump
EOF

# ---------------------------------------------------------------- the unprivileged test client
if ! id "$CLIENT_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$CLIENT_USER"
fi
CLIENT_HOME=$(getent passwd "$CLIENT_USER" | cut -d: -f6)
chmod 700 "$CLIENT_HOME"
install -d -m 700 -o "$CLIENT_USER" -g "$CLIENT_USER" "$CLIENT_HOME/.ssh"
install -m 600 -o "$CLIENT_USER" -g "$CLIENT_USER" "$KEY" "$CLIENT_HOME/.ssh/$(basename "$KEY")"
install -m 644 -o "$CLIENT_USER" -g "$CLIENT_USER" "$KEY.pub" "$CLIENT_HOME/.ssh/$(basename "$KEY").pub"
install -m 644 -o "$CLIENT_USER" -g "$CLIENT_USER" "$KNOWN_HOSTS" "$CLIENT_HOME/.ssh/$(basename "$KNOWN_HOSTS")"
sed "s#$KEY#$CLIENT_HOME/.ssh/$(basename "$KEY")#; s#$KNOWN_HOSTS#$CLIENT_HOME/.ssh/$(basename "$KNOWN_HOSTS")#" \
    "$SSH_CONFIG" >"$CLIENT_HOME/.ssh/$(basename "$SSH_CONFIG")"
chown "$CLIENT_USER:" "$CLIENT_HOME/.ssh/$(basename "$SSH_CONFIG")"
sed "s#@UP_SH@#$(printf '%q' "$HERE/up.sh")#" "$HERE/admin.sh" | write_if_changed /usr/local/sbin/hpcsl-admin 755 || true
write_if_changed /etc/sudoers.d/hpcsl-test 440 <<EOF || true
# generated by tests/cluster/up.sh: the test client may ask for these root actions only
$CLIENT_USER ALL=(root) NOPASSWD: /usr/local/sbin/hpcsl-admin
EOF
visudo -cq -f /etc/sudoers.d/hpcsl-test || die "bad /etc/sudoers.d/hpcsl-test"

# ---------------------------------------------------------------- summary
"$HERE/status.sh" >/dev/null || { "$HERE/status.sh" >&2 || true; die "cluster is not healthy"; }
sinfo
echo "sacct: answers, $(sacct -n -X -S now-1days | wc -l) job(s) in the last day"
echo "cluster=$CLUSTER partition=$PARTITION nodes=n[1-4] ssh=127.0.0.1:${SSH_PORTS[*]} key=$KEY user=$TEST_USER client=$CLIENT_USER"
log "cluster ready, total $(elapsed) s"
