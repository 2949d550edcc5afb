#!/usr/bin/env bash
# Exit 0 when the single-host test cluster brought up by up.sh is healthy;
# otherwise print each problem found (one line each) and exit 1.
set -uo pipefail

NODES=(n1 n2 n3 n4)
PARTITION=debug
SSH_PORTS=(2222 2223)
STATE=/run/hpcsl
problems=()

pid_alive() {  # pid_alive PIDFILE PATTERN
    local f=$1 pat=$2 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq -- "$pat"
}

for c in sinfo sacct scontrol munge mysqladmin; do
    command -v "$c" >/dev/null 2>&1 || problems+=("command $c not installed")
done

if ((${#problems[@]} == 0)); then
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 || problems+=("munged not answering")
    timeout 5 mysqladmin --connect-timeout=3 ping >/dev/null 2>&1 || problems+=("mariadb not answering")
    pid_alive /run/slurmdbd.pid slurmdbd || problems+=("slurmdbd not running")
    pid_alive /run/slurmctld.pid slurmctld || problems+=("slurmctld not running")
    for n in "${NODES[@]}"; do
        pid_alive "/run/slurmd-$n.pid" "slurmd .*-N $n( |$)" || problems+=("slurmd $n not running")
    done
    if out=$(timeout 10 sinfo -h -N -p "$PARTITION" -o '%N %t' 2>&1); then
        good=$(grep -Ec ' (idle|mix|alloc|comp)$' <<<"$out")
        if ((good != ${#NODES[@]})); then
            problems+=("sinfo: $good/${#NODES[@]} nodes usable: $(tr '\n' ' ' <<<"$out")")
        fi
    else
        problems+=("sinfo failed: $(head -1 <<<"$out")")
    fi
    if ! out=$(timeout 10 sacct -n -X -S now-1hours 2>&1); then
        problems+=("sacct failed: $(head -1 <<<"$out")")
    fi
fi
for port in "${SSH_PORTS[@]}"; do
    if ! pid_alive "$STATE/sshd-$port.pid" "hpcsl_sshd_config -p $port " \
        || ! timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
        problems+=("sshd on 127.0.0.1:$port not running")
    fi
done

if ((${#problems[@]})); then
    printf 'status: %s\n' "${problems[@]}"
    exit 1
fi
echo "status: cluster healthy"
exit 0
