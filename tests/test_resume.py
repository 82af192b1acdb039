"""Exact resume under real `horovodrun -np 2`, dropout on: a run stopped (or killed with
kill -9) after its checkpoint at step K and resumed to 2K ends with every saved variable equal to
the unbroken 2K-step run's. The data position and LSTM rows of each rank ride in the checkpoint,
and candidates and dropout masks come from stateless seeds keyed by (seed, rank, step)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO_ROOT, run, write_tiny_demo_corpus
from tests.test_multiprocess import HOROVODRUN

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

# Dropout on; ~60 steps make an epoch of a rank's share, so 2K crosses an epoch boundary.
TINY = "batch_size=4,num_steps=5,emb_size=8,state_size=16,projected_size=8,num_sampled=16,keep_prob=0.8"
K = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_demo_corpus(tmp_path_factory.mktemp("resume-corpus") / "demo")


def train_command(corpus, logdir, max_steps, *extra, ranks=2):
    args = [sys.executable, "-m", "lm1b_hvd.train", "--datadir", str(corpus), "--logdir", str(logdir),
            "--preset", "demo", "--hpconfig", TINY, "--max_steps", str(max_steps), "--log_every", "1000",
            "--checkpoint_secs", "100000", *extra]
    return [HOROVODRUN, "-np", str(ranks), "--gloo", *args] if ranks > 1 else args


def train(corpus, logdir, max_steps, *extra, ranks=2):
    result = run(train_command(corpus, logdir, max_steps, *extra, ranks=ranks), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def saved_variables(logdir, step):
    reader = tf.train.load_checkpoint(str(logdir / f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "save_counter" not in name and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_variables(expected, got, atol=1e-6):
    assert sorted(expected) == sorted(got)
    for name, value in expected.items():
        if isinstance(value, bytes):
            assert value == got[name], name
        else:
            np.testing.assert_allclose(got[name], value, rtol=0, atol=atol, err_msg=name)


def kill_tree(pid):
    """SIGKILL to a process and every descendant (horovodrun's ranks start their own sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    doomed, queue = [], [pid]
    while queue:
        current = queue.pop()
        doomed.append(current)
        queue.extend(children.get(current, []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def unbroken(corpus, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("unbroken") / "log"
    train(corpus, logdir, 2 * K)
    return saved_variables(logdir, 2 * K)


def test_stopped_at_k_and_resumed_equals_the_unbroken_run(corpus, unbroken, tmp_path):
    logdir = tmp_path / "log"
    train(corpus, logdir, K)
    out = train(corpus, logdir, 2 * K)
    assert f"resumed from {logdir}/ckpt-{K} at step {K} (epoch 0, the same data position and LSTM rows)" in out
    resumed = saved_variables(logdir, 2 * K)
    assert resumed["run_position/streams/.ATTRIBUTES/VARIABLE_VALUE"].decode().count("epoch") == 2
    assert_same_variables(unbroken, resumed)


def test_killed_after_its_checkpoint_and_resumed_equals_the_unbroken_run(corpus, unbroken, tmp_path):
    logdir = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    victim = subprocess.Popen(train_command(corpus, logdir, 3 * K, "--checkpoint_steps", str(K)), cwd=REPO_ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (logdir / "checkpoint").exists() or f"ckpt-{K}" not in (logdir / "checkpoint").read_text():
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint at step K"
        time.sleep(0.02)
    kill_tree(victim.pid)
    victim.wait()
    latest = int(tf.train.latest_checkpoint(str(logdir)).rsplit("-", 1)[1])
    assert latest in (K, 2 * K)
    train(corpus, logdir, 2 * K)
    assert_same_variables(unbroken, saved_variables(logdir, 2 * K))


def test_resuming_with_another_number_of_ranks_says_the_data_order_restarts(corpus, tmp_path):
    logdir = tmp_path / "log"
    train(corpus, logdir, 6)
    out = train(corpus, logdir, 10, ranks=1)
    assert (f"resumed from {logdir}/ckpt-6 at step 6; the checkpoint was written by 2 rank(s), this run has 1: "
            "the data order restarts and the LSTM rows start from zero") in out
    assert "stopped at step 10 (max_steps)" in out


FROM_MAIN = REPO_ROOT / "tests" / "data" / "checkpoint-3c202e8"


def test_a_checkpoint_written_by_an_earlier_main_resumes_to_its_unbroken_run(tmp_path):
    """tests/data/checkpoint-3c202e8: a 2-rank run of the demo preset (average_tables, dropout)
    stopped at step 3 by the trainer of commit 3c202e8, and the same run unbroken to step 6. The
    checkpoint resumes exactly, and the steps after it are the ones that trainer took."""
    logdir = tmp_path / "log"
    shutil.copytree(FROM_MAIN / "log", logdir)
    out = train(FROM_MAIN / "corpus", logdir, 6)
    assert f"resumed from {logdir}/ckpt-3 at step 3 (epoch 0, the same data position and LSTM rows)" in out
    # Another machine may run other kernels of oneDNN than the one that wrote it: 1e-5, not 1e-6.
    assert_same_variables(saved_variables(FROM_MAIN / "unbroken", 6), saved_variables(logdir, 6), atol=1e-5)
