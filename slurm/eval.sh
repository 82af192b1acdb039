#!/usr/bin/env bash
# The checkpoint-polling evaluator as its own one-task job, beside a training job.
#
#   sbatch slurm/eval.sh --logdir L --datadir D [--mode eval_test_ave|eval_train] [--once] [--timeout S]
#   train=$(sbatch --parsable slurm/train.sh --datadir D --logdir L)
#   sbatch --dependency=after:$train slurm/eval.sh --logdir L --datadir D --timeout 3600
#
# It reads the checkpoints the trainer writes into L (the `checkpoint` file
# names the newest), evaluates each new one and writes L/<mode>/ summaries.
# One GPU by default; `sbatch --gpus=0 slurm/eval.sh ...` runs it on the CPU.
#SBATCH --job-name=lm1b-eval
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=4
#SBATCH --time=1-00:00:00
#SBATCH --output=lm1b-eval-%j.out
set -uo pipefail

PYTHON=${LM1B_PYTHON:-${SLURM_SUBMIT_DIR:-.}/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "error: $PYTHON not found; run install.sh first or set LM1B_PYTHON" >&2
  exit 1
fi
cd "${SLURM_SUBMIT_DIR:-.}"
echo "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: evaluator $(date -u +%FT%TZ)"
exec "$PYTHON" -m lm1b_hvd.evaluate "$@"
