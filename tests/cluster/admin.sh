#!/usr/bin/env bash
# The few things the unprivileged test client may ask root to do on the test cluster,
# through `sudo -n hpcsl-admin ...` (up.sh installs this file as /usr/local/sbin/hpcsl-admin
# with a sudoers rule for the client user; nothing else runs as root for the tests).
#
#   hpcsl-admin stop slurmctld|slurmdbd      kill a daemon (a test of its outage)
#   hpcsl-admin up                           bring the cluster back (tests/cluster/up.sh)
#   hpcsl-admin drop-ssh PORT [CLIENT_PORT]  kill the sshd processes serving connections to
#                                            PORT (only the one from CLIENT_PORT if given),
#                                            never the listener: a dropped connection
set -euo pipefail
UP=@UP_SH@       # replaced at install with the path of the up.sh that installed this file
STATE=/run/hpcsl

case ${1:-} in
    stop)
        case ${2:-} in
            slurmctld|slurmdbd) pkill -x "$2" || true ;;
            *) echo "hpcsl-admin stop: slurmctld or slurmdbd, not '${2:-}'" >&2; exit 2 ;;
        esac ;;
    up)
        exec bash "$UP" ;;
    drop-ssh)
        port=${2:?hpcsl-admin drop-ssh PORT [CLIENT_PORT]}
        client=${3:-}
        [[ $port =~ ^[0-9]+$ && ( -z $client || $client =~ ^[0-9]+$ ) ]] \
            || { echo "hpcsl-admin drop-ssh: ports are numbers" >&2; exit 2; }
        listener=$(cat "$STATE/sshd-$port.pid")
        filter="( sport = :$port )"
        [[ -n $client ]] && filter="( sport = :$port and dport = :$client )"
        # pick every process of the session first, then kill: once a session's privileged
        # monitor is gone, its unprivileged child (user@notty, which holds the socket too)
        # is reparented to init and would no longer look like one of this listener's
        victims=()
        for pid in $(ss -tnpH state established "$filter" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
            [[ $pid == "$listener" ]] && continue
            p=$pid
            while ((p > 1)); do   # only sessions of this listener
                p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 1)
                if [[ $p == "$listener" ]]; then victims+=("$pid"); break; fi
            done
        done
        killed=0
        for pid in ${victims[@]+"${victims[@]}"}; do
            kill -KILL "$pid" 2>/dev/null && killed=$((killed + 1))
        done
        echo "$killed" ;;
    *)
        echo "usage: hpcsl-admin stop slurmctld|slurmdbd | up | drop-ssh PORT [CLIENT_PORT]" >&2
        exit 2 ;;
esac
