"""Faults while a run saves: kill -9 at random moments, a full disk, a log directory that turns
read-only. Each leaves the previous checkpoint restorable, and the last two stop the run with
one line. The disk faults mount a small tmpfs or a read-only bind, so need root; .ci/run sets
LM1B_REQUIRE_MOUNT=1 so that there they fail instead of skipping."""
import os
import random
import re
import shutil
import subprocess
import time

import pytest
import tensorflow as tf

from tests.helpers import SLOW_TO_SAVE, kill_tree, latest_step, run, start, train_command

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`


def command(corpus, logdir, max_steps, *extra):
    """This module's train command: a model whose checkpoints take a while to write."""
    return train_command(corpus, logdir, *extra, max_steps=max_steps, hpconfig=SLOW_TO_SAVE)


def assert_restorable(logdir):
    """The checkpoint the `checkpoint` file names loads whole."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(logdir)))
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB at tmp_path/disk, unmounted afterwards."""
    mounted = []

    def mount(megabytes):
        point = tmp_path / "disk"
        point.mkdir()
        mount_or_skip("-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(point))
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_kill_9_at_random_moments_of_saving_every_step_always_resumes(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    rng = random.Random(7)
    for _ in range(5):
        before = latest_step(logdir)
        victim = start(command(tiny_corpus, logdir, 100_000, "--checkpoint_steps", "1"))
        deadline = time.monotonic() + 120
        while latest_step(logdir) < before + 2:  # training again, saving every step
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][-2000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        kill_tree(victim.pid)
        victim.communicate()
        assert_restorable(logdir)
    listed = latest_step(logdir)
    target = listed + 3
    result = run(command(tiny_corpus, logdir, target), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The checkpoint the `checkpoint` file lists, or a newer one whose files were whole when the
    # kill came before that file named it.
    resumed = re.search(rf"resumed from {logdir}/ckpt-(\d+) at step (\d+) ", result.stdout)
    assert resumed and resumed.group(1) == resumed.group(2), result.stdout[-2000:]
    assert int(resumed.group(1)) in (listed, listed + 1, listed + 2), (listed, resumed.group(0))
    assert f"stopped at step {target} (max_steps)" in result.stdout


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, small_disk):
    logdir = small_disk(12) / "log"
    result = run(command(tiny_corpus, logdir, 50, "--checkpoint_steps", "1", "--keep_checkpoints", "10"),
                 timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"error: {logdir}: saving the checkpoint of step (\d+) failed \(No space left on device\); "
                         rf"the previous one, {logdir}/ckpt-(\d+), is kept", last)
    assert match, last
    failed, kept = (int(v) for v in match.groups())
    assert kept == failed - 1 == latest_step(logdir)
    assert not list(logdir.glob(f"ckpt-{failed}*")), "the failed save's partial files are removed"
    assert_restorable(logdir)
    moved = tmp_path / "moved"
    shutil.copytree(logdir, moved)
    resumed = run(command(tiny_corpus, moved, kept + 2), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {kept} (epoch" in resumed.stdout


def mount_or_skip(*args):
    """Runs mount; a remount read-only is refused as busy while the trainer has a file open for
    writing under it (a checkpoint being written), so "busy" is retried for a few seconds."""
    deadline = time.monotonic() + 10
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    while result.returncode != 0 and "busy" in result.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        message = f"mount {' '.join(args)} failed here: {result.stderr.strip()}"
        if os.environ.get("LM1B_REQUIRE_MOUNT") == "1":
            pytest.fail(message)
        pytest.skip(message)


def test_a_log_directory_turned_read_only_stops_the_run_and_keeps_the_checkpoint(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    # A checkpoint every 100 steps, so that the remount below finds moments when none is being
    # written (every 5 steps it was refused as busy for 10 s now and then).
    victim = start(command(tiny_corpus, logdir, 100_000, "--checkpoint_steps", "100"))
    deadline = time.monotonic() + 120
    while latest_step(logdir) < 100:
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        # A read-only bind mount over the directory: even root cannot create files in it.
        mount_or_skip("--bind", str(logdir), str(logdir))
        mount_or_skip("-o", "remount,bind,ro", str(logdir))
        _, stderr = victim.communicate(timeout=120)
    finally:
        kill_tree(victim.pid)
        subprocess.run(["umount", "-l", str(logdir)], capture_output=True)
    assert victim.returncode == 1
    last = stderr.strip().splitlines()[-1]
    # Whichever write comes first: the next checkpoint, or a summary writer made on first use.
    assert re.fullmatch(rf"error: {logdir}: saving the checkpoint of step \d+ failed \(Read-only file system\); "
                        rf"the previous one, {logdir}/ckpt-\d+, is kept|"
                        rf"error: {logdir}/(train|eval): cannot create the TensorBoard event file "
                        rf"\(Read-only file system\)|"
                        rf"error: {logdir}/progress.json: cannot write \(Read-only file system\)", last), last
    assert_restorable(logdir)


def test_a_summary_folder_that_cannot_be_made_is_one_line_and_keeps_the_checkpoints(tiny_corpus, tmp_path):
    """The summary writers are made on first use (step 20 here), after checkpoints were written."""
    logdir = tmp_path / "log"
    logdir.mkdir()
    (logdir / "train").write_text("a file where the summaries' folder goes\n")
    result = run(command(tiny_corpus, logdir, 40, "--checkpoint_steps", "5"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {logdir}/train: cannot create the TensorBoard event file (Not a directory)")
    assert latest_step(logdir) == 15
    assert_restorable(logdir)


def test_a_log_directory_read_only_at_start_is_one_line_and_keeps_the_checkpoint(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    first = run(command(tiny_corpus, logdir, 5))
    assert first.returncode == 0, first.stderr[-2000:]
    before = {path.name: path.read_bytes() for path in logdir.iterdir() if path.is_file()}
    try:
        mount_or_skip("--bind", str(logdir), str(logdir))
        mount_or_skip("-o", "remount,bind,ro", str(logdir))
        result = run(command(tiny_corpus, logdir, 10))
    finally:
        subprocess.run(["umount", "-l", str(logdir)], capture_output=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {logdir}/run.lock: cannot open the run's lock file (Read-only file system); the log directory "
        "must be writable")
    assert {path.name: path.read_bytes() for path in logdir.iterdir() if path.is_file()} == before
    assert_restorable(logdir)
