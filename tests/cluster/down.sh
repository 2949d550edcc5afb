#!/usr/bin/env bash
# Stop everything tests/cluster/up.sh started: the four slurmd's, slurmctld, slurmdbd,
# the two loopback sshds, and mariadb/munged (only if up.sh started them).
# Processes are found through pid files and checked by command line: nothing else
# is signalled. Safe to run when nothing is up.
set -uo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "down.sh: must run as root" >&2
    exit 2
fi

NODES=(n1 n2 n3 n4)
SSH_PORTS=(2222 2223)
STATE=/run/hpcsl

pid_of() {  # pid_of PIDFILE PATTERN -> prints pid if alive and matching
    local f=$1 pat=$2 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq -- "$pat" || return 1
    echo "$pid"
}

stop() {  # stop NAME PIDFILE PATTERN
    local name=$1 f=$2 pat=$3 pid
    if pid=$(pid_of "$f" "$pat"); then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
        echo "down: stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

for n in "${NODES[@]}"; do
    stop "slurmd $n" "/run/slurmd-$n.pid" "slurmd .*-N $n( |$)"
done
stop slurmctld /run/slurmctld.pid slurmctld
stop slurmdbd /run/slurmdbd.pid slurmdbd
for port in "${SSH_PORTS[@]}"; do
    stop "sshd :$port" "$STATE/sshd-$port.pid" "hpcsl_sshd_config -p $port "
done

if [[ -e $STATE/mysqld.owned ]]; then
    if pid=$(pid_of /run/mysqld/mysqld.pid 'mysqld|mariadbd'); then
        mysqladmin -u root shutdown 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        echo "down: stopped mariadb (pid $pid)"
    fi
    # mysqld_safe exits by itself after a clean shutdown; make sure it does
    stop mysqld_safe "$STATE/mysqld_safe.pid" mysqld_safe >/dev/null
    rm -f "$STATE/mysqld.owned"
fi
if [[ -e $STATE/munged.owned ]]; then
    stop munged /run/munge/munged.pid munged
    rm -f "$STATE/munged.owned"
fi
echo "down: done"
