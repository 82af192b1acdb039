"""slurm/train.sh and slurm/eval.sh submitted to a real one-node Slurm on this machine.

.ci/run installs Slurm and munge and sets LM1B_REQUIRE_SLURM=1, so there a
missing Slurm fails instead of skipping.
"""
import os
import re
import signal
import sys
import time

import pytest
import tensorflow as tf

from tests import slurm_cluster
from tests.helpers import REPO_ROOT, logged_step, ranks_of, train_flags

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

JOB_ENV = {"LM1B_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = slurm_cluster.missing_binaries()
    if missing:
        message = f"Slurm not installed here (missing: {', '.join(missing)}); .ci/run installs it"
        if os.environ.get("LM1B_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("slurm")
    slurm = slurm_cluster.SlurmCluster(str(root), cpus=max(os.cpu_count(), 2), fake_gpus=2)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def submit(cluster, tmp_path, script, sbatch_args, script_args, env_extra=None):
    out = cluster.run("sbatch", "--parsable", f"--chdir={REPO_ROOT}", f"--output={tmp_path}/%x-%j.out",
                      *sbatch_args, str(REPO_ROOT / "slurm" / script), *script_args,
                      env_extra={**JOB_ENV, **(env_extra or {})}, check=False)
    assert out.returncode == 0, f"sbatch {script}: {out.stderr.strip()}"
    return out.stdout.strip().split(";")[0]


def job_output(tmp_path, job_id):
    (path,) = [p for p in tmp_path.iterdir() if p.name.endswith(f"-{job_id}.out")]
    return path.read_text()


TRAIN_RESOURCES = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                   "--time=10"]


@pytest.mark.parametrize("launcher", [pytest.param("srun", marks=pytest.mark.every_stack), "mpirun"])
def test_sbatch_train_sh_then_eval_sh(cluster, tiny_corpus, tmp_path, launcher):
    logdir = tmp_path / "log"
    train_id = submit(cluster, tmp_path, "train.sh", TRAIN_RESOURCES,
                      train_flags(tiny_corpus, logdir, "--log_every", 4, max_steps=12),
                      env_extra={"LM1B_LAUNCHER": launcher, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                 "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    assert cluster.wait_for(train_id) == "COMPLETED", job_output(tmp_path, train_id)
    log = job_output(tmp_path, train_id)
    assert f"launcher {launcher}" in log and "2 rank(s)" in log
    assert "stopped at step 12 (max_steps)" in log
    assert tf.train.latest_checkpoint(str(logdir)).endswith("ckpt-12")
    train_eval = float(re.search(r"step 12 \| heldout perplexity ([\d.]+)", log).group(1))

    eval_id = submit(cluster, tmp_path, "eval.sh", ["--gpus=0", "--cpus-per-task=1", "--time=10"],
                     ["--logdir", str(logdir), "--datadir", str(tiny_corpus), "--once"])
    assert cluster.wait_for(eval_id) == "COMPLETED", job_output(tmp_path, eval_id)
    evaluated = float(re.search(r"eval_test_ave step 12 \| perplexity ([\d.]+)",
                                job_output(tmp_path, eval_id)).group(1))
    assert evaluated == pytest.approx(train_eval, rel=2e-2)
    assert os.listdir(logdir / "eval_test_ave")


def test_a_job_whose_tasks_cannot_launch_fails(cluster, tiny_corpus, tmp_path):
    """srun itself exits 0 when its tasks fail to launch: the job must still end FAILED."""
    logdir = tmp_path / "log"
    # PMIx cannot make the step's directory under a parent that does not exist.
    job_id = submit(cluster, tmp_path, "train.sh", TRAIN_RESOURCES,
                    train_flags(tiny_corpus, logdir, max_steps=4),
                    env_extra={"SLURM_PMIX_TMPDIR": str(tmp_path / "missing" / "dir"), "TMPDIR": str(tmp_path)})
    assert cluster.wait_for(job_id) == "FAILED", job_output(tmp_path, job_id)
    log = job_output(tmp_path, job_id)
    assert "task 0 launch failed" in log
    assert "error: srun exited 0 but started no task on " in log.splitlines()[-1]
    assert not logdir.exists()
    assert not list(tmp_path.glob("lm1b-launched-*"))


def test_a_job_given_gpus_tensorflow_cannot_see_stops_at_start_unless_allowed(cluster, tiny_corpus, tmp_path):
    """The node declares 2 GPUs it does not have: a CPU-only TensorFlow must not quietly train."""
    logdir = tmp_path / "log"
    gpu_job = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10"]
    train_args = train_flags(tiny_corpus, logdir, "--log_every", 2, max_steps=4)
    refused = submit(cluster, tmp_path, "train.sh", gpu_job, train_args)
    assert cluster.wait_for(refused) == "FAILED", job_output(tmp_path, refused)
    errors = [line for line in job_output(tmp_path, refused).splitlines() if line.startswith("error:")]
    assert errors, job_output(tmp_path, refused)
    assert errors[0].startswith("error: SLURM_GPUS_ON_NODE=2 says this job has GPUs, but "), errors[0]
    assert "--allow_cpu" in errors[0]
    assert not logdir.exists(), "nothing written by a refused run"

    allowed = submit(cluster, tmp_path, "train.sh", gpu_job, [*train_args, "--allow_cpu"])
    assert cluster.wait_for(allowed) == "COMPLETED", job_output(tmp_path, allowed)
    log = job_output(tmp_path, allowed)
    assert re.search(r"device rank 0: \S+ CPU \(\d+ threads\)", log), log[-3000:]
    assert "device rank 1: " in log
    assert re.search(r"horovod: 0\.28\.1, (MPI|Gloo) controller, gradients exchanged with", log)
    assert "stopped at step 4 (max_steps)" in log


def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    job_id = submit(cluster, tmp_path, "train.sh", TRAIN_RESOURCES,
                    train_flags(tiny_corpus, logdir, "--log_every", 50, max_steps=600))
    cluster.wait_for(job_id, states=("RUNNING",), timeout=120)
    deadline = time.monotonic() + 180
    while "step 50 |" not in (job_output(tmp_path, job_id) if list(tmp_path.glob("*.out")) else ""):
        assert time.monotonic() < deadline, "training never reported step 50"
        time.sleep(0.5)
    # What Slurm's --signal=B:USR1@300 does before the limit: USR1 to the batch script.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # Slurm holds a requeued job back for cred_expire (tests/slurm_cluster.py) before it may start again.
    final_state = cluster.wait_for(job_id, states=("COMPLETED", "FAILED"), timeout=480)
    log = job_output(tmp_path, job_id)
    assert final_state == "COMPLETED", log[-4000:]
    stopped = int(re.search(r"stopped at step (\d+) \(SIGUSR1\)", log).group(1))
    assert 50 <= stopped < 600
    assert "requeueing job" in log
    assert f"resumed from {logdir}/ckpt-{stopped} at step {stopped}" in log
    assert "stopped at step 600 (max_steps)" in log
    assert cluster.job_field(job_id, "Restarts") == "1"


def test_a_stopped_rank_ends_the_job_which_requeues_and_resumes(cluster, tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    job_id = submit(cluster, tmp_path, "train.sh", TRAIN_RESOURCES,
                    train_flags(tiny_corpus, logdir, "--log_every", 100, "--checkpoint_steps", 200, "--step_timeout", 15,
                                max_steps=800))
    cluster.wait_for(job_id, states=("RUNNING",), timeout=120)
    deadline = time.monotonic() + 180
    while not (logged_step(logdir) >= 300 and len(ranks_of(logdir)) == 2):
        assert time.monotonic() < deadline, "training never reported step 300"
        time.sleep(0.1)
    os.kill(ranks_of(logdir)[1], signal.SIGSTOP)
    # Slurm holds a requeued job back for cred_expire (tests/slurm_cluster.py) before it may start again.
    final_state = cluster.wait_for(job_id, states=("COMPLETED", "FAILED"), timeout=480)
    log = job_output(tmp_path, job_id)
    assert final_state == "COMPLETED", log[-4000:]
    assert re.search(r"error: rank 0: no training step completed for 1\d s, in step \d+ .*limit 15 s", log), log[-4000:]
    assert "a rank stopped answering (see above); requeueing job" in log
    saved = int(re.search(r"resumed from \S+/ckpt-(\d+) at step \d+", log).group(1))
    assert saved >= 200
    assert "stopped at step 800 (max_steps)" in log
    assert cluster.job_field(job_id, "Restarts") == "1"
