"""Exact resume under real `horovodrun -np 2`, dropout on: a run stopped (or killed with
kill -9) after its checkpoint at step K and resumed to 2K ends with every saved variable equal to
the unbroken 2K-step run's. The data position and LSTM rows of each rank ride in the checkpoint,
and candidates and dropout masks come from stateless seeds keyed by (seed, rank, step)."""
import shutil
import subprocess
import time

import pytest

from tests.helpers import (DROPOUT, REPO_ROOT, assert_same_variables, kill_tree, latest_step, saved_variables, start,
                           train, train_command)

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

K = 40  # ~60 steps make an epoch of a rank's share, so 2K crosses an epoch boundary


def train_to(corpus, logdir, steps, *extra, ranks=2):
    """This module's run: the tiny model with dropout, on 2 ranks."""
    return train(corpus, logdir, *extra, max_steps=steps, hpconfig=DROPOUT, ranks=ranks)


@pytest.fixture(scope="module")
def unbroken(tiny_corpus, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("unbroken") / "log"
    train_to(tiny_corpus, logdir, 2 * K)
    return saved_variables(logdir, 2 * K)


@pytest.mark.every_stack
def test_stopped_at_k_and_resumed_equals_the_unbroken_run(tiny_corpus, unbroken, tmp_path):
    logdir = tmp_path / "log"
    train_to(tiny_corpus, logdir, K)
    out = train_to(tiny_corpus, logdir, 2 * K)
    assert f"resumed from {logdir}/ckpt-{K} at step {K} (epoch 0, the same data position and LSTM rows)" in out
    resumed = saved_variables(logdir, 2 * K)
    assert resumed["run_position/streams/.ATTRIBUTES/VARIABLE_VALUE"].decode().count("epoch") == 2
    assert_same_variables(unbroken, resumed)


def test_killed_after_its_checkpoint_and_resumed_equals_the_unbroken_run(tiny_corpus, unbroken, tmp_path):
    logdir = tmp_path / "log"
    victim = start(train_command(tiny_corpus, logdir, "--checkpoint_steps", K, max_steps=3 * K, hpconfig=DROPOUT,
                                 ranks=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (logdir / "checkpoint").exists() or f"ckpt-{K}" not in (logdir / "checkpoint").read_text():
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint at step K"
        time.sleep(0.02)
    kill_tree(victim.pid)
    victim.wait()
    assert latest_step(logdir) in (K, 2 * K)
    train_to(tiny_corpus, logdir, 2 * K)
    assert_same_variables(unbroken, saved_variables(logdir, 2 * K))


def test_resuming_with_another_number_of_ranks_says_the_data_order_restarts(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    train_to(tiny_corpus, logdir, 6)
    out = train_to(tiny_corpus, logdir, 10, ranks=1)
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
    out = train_to(FROM_MAIN / "corpus", logdir, 6)
    assert f"resumed from {logdir}/ckpt-3 at step 3 (epoch 0, the same data position and LSTM rows)" in out
    # Another machine may run other kernels of oneDNN than the one that wrote it: 1e-5, not 1e-6.
    assert_same_variables(saved_variables(FROM_MAIN / "unbroken", 6), saved_variables(logdir, 6), atol=1e-5)
