#!/usr/bin/env bash
# Runs launch/slurm.sbatch under a real SLURM on this machine: a one-host cluster (this host is the
# controller and the only compute node, 2 CPUs) with its own munge key, configuration and state under
# WORK, nothing in /etc touched. Then:
#   1. submits launch/slurm.sbatch for a short 2-process expert-parallel run and waits (with a timeout);
#   2. once the run has logged a few steps, `scancel --batch --signal=USR1` (what `--signal=B:USR1@120`
#      does before the time limit): the script stops the run at a sealed checkpoint (exit code 5 of
#      msmoe-train) and requeues the job; the requeued job resumes from that checkpoint and completes;
#   3. checks the job's final state (COMPLETED, exit 0, one restart), the run dir (every step once, the
#      checkpoint of the preemption step) and that the loss trace equals the same 2-process run on bare
#      metal (launch/torchrun.sh, uninterrupted).
# Stops the daemons it started (by process id) and cancels its jobs at the end. Installs slurmctld, slurmd,
# munge and slurm-client with apt-get when they are missing. Opt-in in CI: CI_SLURM=1 .ci/run.
# Environment: WORK (default /var/tmp/msmoe_slurm), PYTHON (default .venv/bin/python), STEPS (30),
# SLURM_PORTS (controller and node ports, default "6817 6818").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${WORK:-/var/tmp/msmoe_slurm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
STEPS=${STEPS:-30}
read -r CTLD_PORT SLURMD_PORT <<<"${SLURM_PORTS:-6817 6818}"
START=$SECONDS
STAGE_START=$SECONDS
PIDS=()
JOB=

say() { echo "[test_slurm $(date -u +%H:%M:%S)] $*"; }
die() { echo "[test_slurm] FAILED: $*" >&2; exit 1; }
stage_done() { say "$1: $((SECONDS - STAGE_START)) s"; STAGE_START=$SECONDS; }
cleanup() {
    local rc=$?
    if [[ -n "$JOB" ]]; then scancel "$JOB" 2>/dev/null || true; sleep 2; fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do  # slurmd, slurmctld, munged: the reverse of the start order
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 1; done
    done
    [[ ${#PIDS[@]} -gt 0 ]] && say "stopped the daemons this script started (pids ${PIDS[*]})"
    exit "$rc"
}
trap cleanup EXIT

# --- 0. packages -------------------------------------------------------------------------------------
missing=()
for pkg_cmd in slurmctld:slurmctld slurmd:slurmd munge:munged slurm-client:sbatch; do
    command -v "${pkg_cmd#*:}" >/dev/null || missing+=("${pkg_cmd%:*}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
id munge >/dev/null 2>&1 || die "the munge package did not create the munge user"
stage_done "packages"

# --- 1. a one-host cluster ----------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"/{munge,munge-run,state,spool,log}
chmod 755 "$WORK"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$WORK/munge" "$WORK/munge-run"
chmod 700 "$WORK/munge"  # the key: munge alone
chmod 755 "$WORK/munge-run"  # the socket: every user
chmod 400 "$WORK/munge/munge.key"
MUNGE_SOCKET="$WORK/munge-run/munge.socket"
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --key-file="$WORK/munge/munge.key" \
    --socket="$MUNGE_SOCKET" --pid-file="$WORK/munge-run/munged.pid" --log-file="$WORK/munge/munged.log" \
    --seed-file="$WORK/munge/munged.seed" >"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 20); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.5; done
munge --socket="$MUNGE_SOCKET" -n </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null || die "munge does not work"

HOST=$(hostname -s)
export SLURM_CONF="$WORK/slurm.conf"
cat >"$SLURM_CONF" <<EOF
# One-host test cluster made by launch/test_slurm.sh
ClusterName=msmoe-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
/usr/sbin/slurmd -D -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o %T | grep -q idle || { tail -5 "$WORK"/log/*.log; die "the node did not become idle within 60 s"; }
say "cluster up: $(sinfo -h -o '%P %D node(s) %c CPUs %T')"
stage_done "munge + slurmctld + slurmd"

# --- 2. submit, preempt with USR1, requeue, resume ----------------------------------------------------
RUN="$WORK/run"
TRAIN_ARGS=(--config configs/quickstart.yaml parallel.ep_size=2 model.num_layers=2 data.synthetic_lines=4000
    train.progress=false logging.log_every=1 checkpoint.every_steps=1000 train.max_steps="$STEPS")
job_field() { scontrol show job "$JOB" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1; }
wait_for() {  # wait_for SECONDS WHAT CONDITION...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq "$limit"); do "$@" && return 0; sleep 1; done
    tail -20 "$WORK"/slurm-*.out 2>/dev/null
    die "$what: not within $limit s (job state $(job_field JobState))"
}
logged_steps() { grep -c '"loss"' "$RUN/metrics.jsonl" || true; }
# One node, one srun task, GPUS_PER_NODE=2 torchrun workers (on CPU); the #SBATCH lines ask for 2 GPU
# nodes, so the allocation is overridden on the command line. The job inherits this environment.
JOB=$(GPUS_PER_NODE=2 PYTHON="$PYTHON" sbatch --parsable --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 \
    --gpus-per-node=0 --output="$WORK/slurm-%j.out" launch/slurm.sbatch "${TRAIN_ARGS[@]}" \
    train.run_dir="$RUN" data.path="$WORK/data")
say "submitted job $JOB"
wait_for 300 "job $JOB running" bash -c "[[ \$(scontrol show job $JOB) == *JobState=RUNNING* ]]"
wait_for 600 "3 steps logged" bash -c "[[ -f '$RUN/metrics.jsonl' ]] && (( \$(grep -c '\"loss\"' '$RUN/metrics.jsonl') >= 3 ))"
stage_done "job $JOB started, 3 steps logged"
scancel --batch --signal=USR1 "$JOB"
say "sent USR1 to the batch script of job $JOB at step $(logged_steps)"
wait_for 300 "requeue" bash -c "[[ \$(scontrol show job $JOB) == *Restarts=1* ]]"
[[ -d "$RUN/checkpoints" ]] || { tail -20 "$WORK/slurm-$JOB.out"; die "no checkpoint was written on USR1"; }
PREEMPT_STEP=$(find "$RUN/checkpoints" -maxdepth 1 -name 'step_*' -printf '%f\n' | sort | head -n 1)
stage_done "preempted at checkpoint $PREEMPT_STEP, requeued"
wait_for 900 "the requeued job to finish" bash -c "[[ \$(scontrol show job $JOB) =~ JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL) ]]"
stage_done "requeued job resumed and finished"
say "job $JOB: JobState=$(job_field JobState) ExitCode=$(job_field ExitCode) Restarts=$(job_field Restarts)"
[[ "$(job_field JobState)" == COMPLETED && "$(job_field ExitCode)" == 0:0 && "$(job_field Restarts)" == 1 ]] \
    || { tail -30 "$WORK"/slurm-*.out; die "job $JOB did not complete after one requeue"; }

# --- 3. checks: the log, the run dir, and the trace against bare metal --------------------------------
OUT="$WORK/slurm-$JOB.out"
grep -q "SIGUSR1 (time limit near)" "$OUT" || die "the batch script did not report the USR1"
grep -q "requeueing job $JOB" "$OUT" || die "the batch script did not requeue"
PREEMPT_N=$((10#${PREEMPT_STEP#step_}))
grep -q "resuming from step $PREEMPT_N" "$OUT" || die "the requeued job did not resume from step $PREEMPT_N"
[[ -f "$RUN/checkpoints/$PREEMPT_STEP/complete.json" ]] || die "the preemption checkpoint is not sealed"
[[ -f "$RUN/checkpoints/step_$(printf %08d "$STEPS")/complete.json" ]] || die "no sealed final checkpoint"
say "log of job $JOB (preemption and resume lines):"
grep -E "SIGUSR1|preempt|requeue|resuming from|^done" "$OUT" | sed 's/^/    /'

rm -rf "$WORK/bare"
OMP_NUM_THREADS=1 NPROC=2 PYTHON="$PYTHON" nice launch/torchrun.sh "${TRAIN_ARGS[@]}" \
    train.run_dir="$WORK/bare/run" data.path="$WORK/bare/data" >"$WORK/bare.log" 2>&1 \
    || { tail -20 "$WORK/bare.log"; die "the bare-metal run"; }
stage_done "bare metal: the same 2-process run, uninterrupted"
trace() {
    "$PYTHON" -c 'import json, sys
for line in open(sys.argv[1] + "/metrics.jsonl"):
    r = json.loads(line)
    if "loss" in r:
        print(r["step"], repr(r["loss"]))' "$1"
}
a=$(trace "$RUN")
b=$(trace "$WORK/bare/run")
[[ "$(echo "$a" | cut -d' ' -f1 | tr '\n' ' ')" == "$(seq -s ' ' 1 "$STEPS") " ]] || die "the SLURM run's steps are not 1..$STEPS once each"
[[ "$a" == "$b" ]] || { diff <(echo "$a") <(echo "$b") || true; die "the loss traces differ (SLURM vs bare metal)"; }
say "loss trace (SLURM, preempted at step $PREEMPT_N and requeued) equals bare metal, $STEPS rows:"
printf '    %s\n' "${a//$'\n'/$'\n    '}"
say "total $((SECONDS - START)) s; logs and run dirs in $WORK"
say "PASSED"
