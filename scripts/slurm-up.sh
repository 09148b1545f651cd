#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `--executor slurm` (needs root).
#
#   scripts/slurm-up.sh      install what is missing (Debian packages), write a one-node
#                            slurm.conf, start munged, slurmctld and slurmd, wait until the node is idle
#   scripts/slurm-down.sh    stop the three daemons by the pids recorded here
#
# The config goes to /etc/slurm/slurm.conf (where sbatch/squeue look) unless a slurm.conf not
# written by this script is there: then nothing is changed and the script fails. State, logs
# and pid files live in $CELLBENCH_SLURM_STATE (default /var/tmp/cellbench-slurm).
# Exit codes: 0 up, 1 failed to start, 3 cannot be installed here (not root, no apt-get).
set -euo pipefail

STATE=${CELLBENCH_SLURM_STATE:-/var/tmp/cellbench-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by cellbench scripts/slurm-up.sh"

say() { echo "slurm-up: $*" >&2; }

if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    say "a cluster answers already (sinfo: $(sinfo -h -o '%P %T %D' | tr '\n' ' '))"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "slurmctld/slurmd/sbatch/munged are missing and cannot be installed here (needs root and apt-get)"
        exit 3
    fi
    say "installing slurmctld slurmd slurm-client munge"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
            || { say "apt-get could not install the SLURM packages"; exit 3; }
    fi
fi
if [ "$(id -u)" != 0 ]; then
    say "starting the daemons needs root"
    exit 3
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script: not touching it"
    exit 1
fi

node=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$STATE"/{ctld,d,log} /etc/slurm
chown -R slurm:slurm "$STATE/ctld"
cat > "$CONF" <<CONF
$MARK
ClusterName=cellbench
SlurmctldHost=$node
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=3600
KillWait=10
MpiDefault=none
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

# munge: its key (the package makes one), run as user munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
fi
for i in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }

slurmctld -i       # -i: ignore state saved by an earlier run of this script
slurmd
for i in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
        say "up: $(sinfo -h -o 'partition %P, %D node(s) %T, %c CPUs')"
        exit 0
    fi
    sleep 1
done
say "the node did not become idle in 60 s (logs in $STATE/log):"
sinfo >&2 || true
tail -5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
