"""A run left alone on a shared cluster: one run per log directory, a rank that stops answering
ends the job, `kill` of horovodrun stops every rank with a checkpoint, a damaged checkpoint
falls back to the one before it, and `lm1b_hvd.status` says where the run stands. Every case
runs the real commands, as real processes (horovodrun with Gloo and with MPI)."""
import json
import os
import re
import signal
import socket
import sys
import time

import pytest

from tests.helpers import (MPI_ENV, SLOW_TO_SAVE, kill_tree, latest_step, logged_step, ranks_of, run, snapshot,
                           start, train_command)

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`


def run_command(corpus, logdir, *extra, ranks=1, controller="--gloo"):
    """This module's train command: a model slow to save, a progress line every 100 steps."""
    return train_command(corpus, logdir, "--log_every", 100, *extra, hpconfig=SLOW_TO_SAVE, ranks=ranks,
                         controller=controller)


def wait_until(condition, seconds, what, process=None):
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended before {what}: {out[-2000:]} {err[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def status(logdir):
    result = run([sys.executable, "-m", "lm1b_hvd.status", "--logdir", str(logdir), "--json"], timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- one run per log directory ----------------------------------------------------------------------------------------

def test_a_second_trainer_is_refused_naming_the_holder_and_readers_never_wait(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    first = run(run_command(tiny_corpus, logdir, "--max_steps", "20", "--eval_every", "10"))
    assert first.returncode == 0, first.stderr[-2000:]
    # The holder resumes and trains on, writing nothing for a long while (no checkpoint, summary
    # or progress line due), so the directory can be compared before and after the second one.
    holder = start(run_command(tiny_corpus, logdir, "--max_steps", "10000000", "--log_every", "10000000",
                           "--summary_every", "10000000"))
    try:
        wait_until(lambda: status(logdir)["running"], 120, "lock taken", holder)
        time.sleep(5)  # past its restore: the holder is in its loop now
        before = snapshot(logdir)
        second = run(run_command(tiny_corpus, logdir, "--max_steps", "40"), timeout=120)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: {logdir}: in use by another training run, pid {holder.pid} on host "
                            rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                            rf"\({logdir}/run.lock\); stop that run or use another --logdir", line), line
        assert "resumed" not in second.stdout and "starting" not in second.stdout
        assert snapshot(logdir) == before, "the refused run wrote into the log directory"

        # The readers read while the run holds the directory, and never take its lock.
        for command in (["lm1b_hvd.evaluate", "--logdir", str(logdir), "--datadir", str(tiny_corpus), "--once"],
                        ["lm1b_hvd.score", "--logdir", str(logdir), "--datadir", str(tiny_corpus), "--input", "-"],
                        ["lm1b_hvd.sample", "--logdir", str(logdir), "--datadir", str(tiny_corpus), "--num", "1"],
                        ["lm1b_hvd.export", "--logdir", str(logdir), "--datadir", str(tiny_corpus),
                         "--out", str(tmp_path / "exported")]):
            result = run([sys.executable, "-m", *command], timeout=180, stdin_text="w1 w2\n")
            assert result.returncode == 0, (command, result.stderr[-2000:])
        assert status(logdir)["running"] and status(logdir)["holder"]["pid"] == holder.pid
    finally:
        kill_tree(holder.pid)
        holder.wait()

    # kill -9 leaves no lock behind: the next run takes the directory and resumes.
    assert not status(logdir)["running"]
    after = run(run_command(tiny_corpus, logdir, "--max_steps", "30"), timeout=180)
    assert after.returncode == 0, after.stderr[-2000:]
    assert f"resumed from {logdir}/ckpt-20 at step 20" in after.stdout


def test_status_during_and_after_a_run(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    absent = run([sys.executable, "-m", "lm1b_hvd.status", "--logdir", str(tmp_path / "nowhere")])
    assert absent.returncode == 1 and absent.stderr.strip() == f"error: {tmp_path}/nowhere: no such log directory"

    victim = start(run_command(tiny_corpus, logdir, "--max_steps", "100000", "--eval_every", "100",
                           "--checkpoint_steps", "100"))
    try:
        wait_until(lambda: latest_step(logdir) >= 200 and (logdir / "progress.json").exists(), 240,
                   "checkpoint of step 200", victim)
        during = status(logdir)
        assert during["running"] and during["holder"]["pid"] == victim.pid
        assert during["holder"]["host"] == socket.gethostname()
        assert during["checkpoint"]["step"] >= 200 and during["checkpoint"]["path"].startswith(str(logdir))
        assert during["progress"]["step"] >= 200 and during["progress"]["words_per_sec"] > 0
        assert during["eta_seconds"] > 0
        assert during["best"]["step"] % 100 == 0 and during["best"]["perplexity"] > 1
        screen = run([sys.executable, "-m", "lm1b_hvd.status", "--logdir", str(logdir)]).stdout
        lines = screen.splitlines()
        assert lines[0] == f"log directory {logdir}"
        assert lines[1].startswith(f"run         running: pid {victim.pid} on host {socket.gethostname()} since ")
        assert re.match(rf"checkpoint  step \d+: {logdir}/ckpt-\d+, written ", lines[2])
        assert re.match(r"progress    step \d+ \| loss \d+\.\d{3} \| [\d,]+ words/s \| logged ", lines[3])
        assert re.match(r"eta         \d+:\d\d:\d\d to --max_steps 100000", lines[4])
        assert re.match(rf"best        heldout perplexity [\d.]+ at step \d+: {logdir}/best/ckpt-\d+", lines[5])
    finally:
        victim.send_signal(signal.SIGTERM)
        victim.communicate(timeout=120)
    after = status(logdir)
    assert not after["running"] and after["holder"]["pid"] == victim.pid and after["eta_seconds"] is None
    assert after["progress"]["step"] <= after["checkpoint"]["step"], "the last progress line is before the stop"


# --- a rank that stops answering --------------------------------------------------------------------------------------

STOPPED_LINE = (r"error: rank {survivor}: no training step completed for 1[5-9] s, in step \d+ \(its collectives wait "
                r"for a rank that stopped answering, unless this rank's own work hangs\); limit 15 s "
                r"\(--step_timeout\); exiting with status 75 so that the job ends and resumes from its last checkpoint")
# Gloo gives up on a silent peer after HOROVOD_GLOO_TIMEOUT_SECONDS (30 s), before a longer --step_timeout.
# Which of its pending operations Gloo names (a send or a receive) depends on where the peer stopped.
GLOO_TIMEOUT_LINE = (r"error: rank {survivor}: a Horovod collective failed after step \d+ \(Horovod[A-Za-z]+: (Timed "
                     r"out waiting 30000ms for (recv|send) operation to complete|Horovod has been shut down)\): another "
                     r"rank ended or stopped answering; exiting with status 75 so that the job ends and resumes from its "
                     r"last checkpoint")


# Rank 1 stopped: rank 0's watchdog ends the job; rank 0 stopped (the one that prints and saves),
# under a longer limit: Gloo's timeout on rank 1 ends it first.
@pytest.mark.parametrize("stopped_rank,timeout,expected", [(1, 15, STOPPED_LINE), (0, 120, GLOO_TIMEOUT_LINE)])
def test_a_stopped_rank_ends_the_job_within_the_timeout_and_the_next_run_resumes(tiny_corpus, tmp_path, stopped_rank,
                                                                                 timeout, expected):
    logdir = tmp_path / "log"
    job = start(run_command(tiny_corpus, logdir, "--max_steps", "100000", "--checkpoint_steps", "200", "--step_timeout",
                        timeout, ranks=2))
    try:
        # Between checkpoints (at 200 and 400), where the limit is the plain --step_timeout.
        wait_until(lambda: latest_step(logdir) >= 200 and logged_step(logdir) >= 300, 240, "step 300", job)
        victim = ranks_of(logdir)[stopped_rank]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, err = job.communicate(timeout=min(timeout, 30) + 60)
        ended = time.monotonic() - stopped_at
    finally:
        kill_tree(job.pid)
    assert job.returncode != 0
    survivor = 1 - stopped_rank
    lines = [line for line in err.splitlines() if line.startswith(f"[{survivor}]<stderr>:error: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch(rf"\[{survivor}\]<stderr>:" + expected.format(survivor=survivor), lines[0]), lines[0]
    assert "Traceback" not in "".join(line for line in err.splitlines() if line.startswith(f"[{survivor}]"))
    assert ended < min(timeout, 30) + 30, f"the job took {ended:.0f} s to end"
    assert not ranks_of(logdir), "a rank outlived the job"

    if stopped_rank == 1:  # the next run resumes (one case: the job's end left an ordinary checkpoint)
        saved = latest_step(logdir)
        resumed = run(run_command(tiny_corpus, logdir, "--max_steps", saved + 20, ranks=2), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {logdir}/ckpt-{saved} at step {saved} (epoch" in resumed.stdout


def test_the_watchdogs_limit_follows_the_runs_steps_and_allows_for_checkpoints(monkeypatch):
    from lm1b_hvd.run import watchdog
    clock = [1000.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    dog = watchdog.StepWatchdog(rank=0)
    dog.step, dog.interval_start = 0, clock[0]

    def step(seconds, activity=None):
        if activity:
            with dog.activity(activity, activity):
                clock[0] += seconds
        else:
            clock[0] += seconds
        dog.beat(dog.step + 1)

    assert dog.limit() == 3 * watchdog.FLOOR_SECONDS, "the first step traces: three limits"
    step(40.0)  # the first step's time (tracing) is not a step time
    assert dog.limit() == watchdog.FLOOR_SECONDS
    for _ in range(10):
        step(30.0)  # slow steps: 20 x 30 s is above the floor
    assert dog.limit() == 600.0
    with dog.activity("checkpoint", "the checkpoint of step 11"):
        assert dog.limit() == 600.0 + 3 * 600.0, "a first checkpoint: three step limits more"
        clock[0] += 100.0
    clock[0] += 30.0
    dog.beat(12)  # the interval holding the checkpoint took 130 s
    with dog.activity("checkpoint", "the checkpoint of step 12"):
        assert dog.limit() == 600.0 + 4 * 130.0
    assert watchdog.StepWatchdog(rank=0, step_timeout=15.0).step_limit() == 15.0
    assert watchdog.stall_warning_seconds(15.0) == 7.5 and watchdog.stall_warning_seconds(0.0) == 60.0


# --- kill of the launcher -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_kill_or_ctrl_c_of_horovodrun_stops_every_rank_at_one_step_with_a_checkpoint(tiny_corpus, tmp_path, controller,
                                                                                    how):
    logdir = tmp_path / "log"
    # Its own process group, as a job started from a terminal has: Ctrl-C is SIGINT to that group.
    job = start(run_command(tiny_corpus, logdir, "--max_steps", "100000", "--checkpoint_steps", "100000", ranks=2,
                        controller=controller), env_extra=MPI_ENV, start_new_session=True)
    try:
        wait_until(lambda: (logdir / "progress.json").exists(), 240, "first progress line", job)
        if how == "kill":
            os.kill(job.pid, signal.SIGTERM)  # what `kill PID` sends
        else:
            os.killpg(job.pid, signal.SIGINT)
        wait_until(lambda: not ranks_of(logdir), 60, "end of every rank")
        out, _ = job.communicate(timeout=30)
    finally:
        kill_tree(job.pid)
    # Ctrl-C reaches every rank: rank 0 may count another rank's vote before its own signal.
    stopped = re.search(r"stopped at step (\d+) \((SIGTERM|SIGINT|the end of the shell running mpirun \(pid \d+\)|"
                        r"stop request on another rank)\); "
                        rf"checkpoint saved in {logdir}", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert latest_step(logdir) == step
    if controller == "--mpi" and how == "ctrl-c":  # one case resumes: the stop's checkpoint is an ordinary one
        resumed = run(run_command(tiny_corpus, logdir, "--max_steps", step + 10, ranks=2), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {logdir}/ckpt-{step} at step {step} (epoch" in resumed.stdout


# --- damaged checkpoints --------------------------------------------------------------------------------------------

def flip_bytes(path, every=3000):
    data = bytearray(path.read_bytes())
    for index in range(100, len(data), every):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_fall_back_to_the_newest_that_loads_and_none_is_one_line(tiny_corpus, tmp_path):
    logdir = tmp_path / "log"
    first = run(run_command(tiny_corpus, logdir, "--max_steps", "20", "--checkpoint_steps", "5"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert [latest_step(logdir)] == [20]
    for data_file in logdir.glob("ckpt-20.data-*"):
        flip_bytes(data_file)  # a bit flip in the newest
    for data_file in logdir.glob("ckpt-15.data-*"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # a truncated copy
    (logdir / "ckpt-10.index").unlink()  # a lost index

    resumed = run(run_command(tiny_corpus, logdir, "--max_steps", "25", "--checkpoint_steps", "5"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, resumed.stdout
    assert re.fullmatch(rf"warning: {logdir}/ckpt-20: cannot restore \(.*Checksum does not match.*\); trying the "
                        r"checkpoint before it", warnings[0]), warnings[0]
    assert warnings[1].startswith(f"warning: {logdir}/ckpt-15: cannot restore (")
    assert warnings[2] == (f"warning: {logdir}/ckpt-10: cannot restore (its index file ckpt-10.index is missing); "
                           "trying the checkpoint before it")
    assert f"resumed from {logdir}/ckpt-5 at step 5 (epoch 0, the same data position and LSTM rows)" in resumed.stdout
    assert latest_step(logdir) == 25

    for index in logdir.glob("ckpt-*.index"):
        index.unlink()
    before = snapshot(logdir, but=("run.lock",))
    refused = run(run_command(tiny_corpus, logdir, "--max_steps", "40"), env_extra={
        "TF_CPP_MIN_LOG_LEVEL": "0"})  # TensorFlow's own warnings on: none may follow the error
    assert refused.returncode == 1
    errors = refused.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: {logdir}: none of its 5 checkpoint\(s\) restores \(ckpt-25, ckpt-20, ckpt-15, "
                        r"ckpt-10, ckpt-5\); the files are kept as they are: repair them, or train into another "
                        r"--logdir", errors[-1]), errors[-1]
    assert "Traceback" not in refused.stderr
    assert snapshot(logdir, but=("run.lock",)) == before, "checkpoint files changed"
