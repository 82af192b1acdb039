#!/usr/bin/env bash
# Train lm1b_hvd on Slurm: one Horovod rank per task, one task per GPU.
#
#   sbatch slurm/train.sh --datadir D --logdir L [--hpconfig k=v,...] [other train flags]
#   sbatch --nodes=4 --gpus-per-node=4 --ntasks-per-node=4 --time=2-00:00:00 slurm/train.sh --datadir D --logdir L
#
# Every #SBATCH line below is a default: sbatch's command line and its input
# environment variables (SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, SBATCH_PARTITION, ...)
# override it. The script's own arguments go to `python -m lm1b_hvd.train`.
# Set up the environment once beforehand (bash install.sh); the job never installs.
#
# Environment knobs:
#   LM1B_PYTHON    python with lm1b_hvd installed (default: $SLURM_SUBMIT_DIR/.venv/bin/python)
#   LM1B_LAUNCHER  srun (default: srun --mpi=pmix) or mpirun (Open MPI's mpirun inside the allocation)
#   LM1B_SRUN_MPI  the srun --mpi plugin (default: pmix; Debian's Open MPI does not work with pmi2)
#   LM1B_MAX_RESTARTS  requeues after a hung rank stop once the job has restarted this often (default: 10)
#
# Preemption and time limits: Slurm sends USR1 to this script 5 minutes before
# the limit; the script passes it on to every rank, the trainer saves a
# checkpoint at the same step on all ranks and exits, and the script requeues
# the job, which resumes from the log directory (the unit of resumption).
#
# A hung rank: when no step completes within --step_timeout, every live rank
# exits (status 75) and names the step; the script requeues the job, which
# resumes from the last checkpoint (at most LM1B_MAX_RESTARTS restarts).
#SBATCH --job-name=lm1b-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=4
#SBATCH --time=1-00:00:00
#SBATCH --output=lm1b-train-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -uo pipefail

PYTHON=${LM1B_PYTHON:-${SLURM_SUBMIT_DIR:-.}/.venv/bin/python}
LAUNCHER=${LM1B_LAUNCHER:-srun}
if [ ! -x "$PYTHON" ]; then
  echo "error: $PYTHON not found; run install.sh first or set LM1B_PYTHON" >&2
  exit 1
fi
cd "${SLURM_SUBMIT_DIR:-.}"

echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} ranks, launcher $LAUNCHER, $(date -u +%FT%TZ)"

# srun exits 0 when no task could be launched ("task 0 launch failed: ..."), so each task
# first marks a file on its node: the first node, this one, always runs tasks.
launch_mark=$(mktemp -u "${TMPDIR:-/tmp}/lm1b-launched-${SLURM_JOB_ID:-0}.XXXXXX")
# A rank that gives up on a hung step writes here (srun's status is the other tasks' signals,
# not its 75): a file in the submit directory, which every node sees.
export LM1B_STALLED_FILE="$PWD/.lm1b-stalled-${SLURM_JOB_ID:-0}"
rm -f "$LM1B_STALLED_FILE"

case "$LAUNCHER" in
  srun)
    srun --mpi="${LM1B_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 \
      bash -c ': > "$0"; exec "$@"' "$launch_mark" "$PYTHON" -m lm1b_hvd.train "$@" &
    ;;
  mpirun)
    # Open MPI reads the allocation from Slurm; as root it also needs the two OMPI_ALLOW_* variables.
    mpirun -np "$SLURM_NTASKS" --bind-to none --map-by slot -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x LM1B_STALLED_FILE \
      "$PYTHON" -m lm1b_hvd.train "$@" &
    ;;
  *)
    echo "error: LM1B_LAUNCHER must be srun or mpirun, got '$LAUNCHER'" >&2
    exit 1
    ;;
esac
launcher_pid=$!

preempted=0
on_warning() {
  preempted=1
  echo "time limit or preemption warning: asking the trainer to checkpoint ($(date -u +%FT%TZ))"
  kill -USR1 "$launcher_pid" 2>/dev/null
}
trap on_warning USR1 TERM

# `wait` returns early when a trapped signal arrives: keep waiting for the launcher itself.
while true; do
  wait "$launcher_pid"
  status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break
done

if [ "$LAUNCHER" = srun ]; then
  if [ "$status" -eq 0 ] && [ ! -e "$launch_mark" ]; then
    echo "error: srun exited 0 but started no task on $(hostname) (its errors are above); the trainer never ran" >&2
    status=1
  fi
  rm -f "$launch_mark"
fi

if [ "$preempted" -eq 1 ] && [ "$status" -eq 0 ]; then
  echo "checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
elif [ -e "$LM1B_STALLED_FILE" ]; then
  rm -f "$LM1B_STALLED_FILE"
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "${LM1B_MAX_RESTARTS:-10}" ]; then
    echo "a rank stopped answering (see above); requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "error: a rank stopped answering, and the job has restarted ${SLURM_RESTART_COUNT:-0} times" \
         "(LM1B_MAX_RESTARTS=${LM1B_MAX_RESTARTS:-10}): not requeued" >&2
  fi
fi
exit "$status"
