#!/usr/bin/env bash
# Stop what scripts/slurm-up.sh started: slurmd, slurmctld and munged, each by its recorded pid.
set -uo pipefail

STATE=${CELLBENCH_SLURM_STATE:-/var/tmp/cellbench-slurm}

stop() {  # NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local name=$1 file=$2 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        kill "$pid"
        for i in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "slurm-down: stopped $name (pid $pid)" >&2
    fi
    rm -f "$file"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop munged "$STATE/munged.pid"
exit 0
