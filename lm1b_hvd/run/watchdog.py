"""A rank that stops answering ends the job: a thread on every rank that exits the process when
no training step completes in time.

Horovod's own stall check (HOROVOD_STALL_CHECK_TIME_SECONDS) runs on the coordinator, rank 0:
it warns, naming the ranks that have not submitted a tensor, but waits on. Its stall shutdown
cannot tell a rank that stopped from rank 0 writing a long checkpoint while the others wait in
the next step's allreduce, and it never runs when the coordinator itself stopped. So the
decision is this watchdog's, on every rank, with a limit that knows about checkpoints and
evaluations; Horovod's warning says who is missing.

The limit between two completed steps is --step_timeout when given, else generous and derived
from the run's own steps: 20 times the slowest recent step, at least FLOOR_SECONDS. The first
interval (tracing, the first broadcast) gets three times that. An interval in which a checkpoint
or an evaluation starts gets, on top, four times the longest such interval so far, or three
step limits the first time: every rank enters them at the same step (they are collectives), so
a rank waiting in the next step for rank 0 to finish writing knows to wait longer.
"""
import collections
import contextlib
import os
import sys
import threading
import time

from lm1b_hvd import console

FLOOR_SECONDS = 300.0
STEP_FACTOR = 20.0  # the automatic limit, in slowest recent steps
FIRST_INTERVAL_FACTOR = 3.0
ACTIVITY_FACTOR = 4.0  # an activity's allowance, in its longest interval so far
RECENT_STEPS = 50
EXIT_STALLED = 75  # EX_TEMPFAIL: try again later
# When set, the rank that gives up also writes its line into this file: srun reports the
# others' signals rather than this status, so slurm/train.sh looks for the file to requeue.
STALLED_FILE_VARIABLE = "LM1B_STALLED_FILE"

TRAINING_STEP = "the training step"
RESUMES = (f"exiting with status {EXIT_STALLED} so that the job ends and resumes from its last checkpoint")


class RankLost(console.UserError):
    """A collective failed because another rank ended or stopped answering: exit EXIT_STALLED."""
    exit_code = EXIT_STALLED


def _mark_stalled(line):
    """The line, also into $LM1B_STALLED_FILE when set (slurm/train.sh requeues on it)."""
    marker = os.environ.get(STALLED_FILE_VARIABLE)
    if marker:
        try:
            with open(marker, "a") as handle:
                handle.write(line + "\n")
        except OSError:
            pass  # the exit status and the line on stderr still say it


def stall_warning_seconds(step_timeout):
    """When Horovod's stall check should warn: its default, 60 s, or sooner when a shorter
    --step_timeout would end the run before it spoke."""
    return min(60.0, step_timeout / 2) if step_timeout else 60.0


class StepWatchdog:
    """Call `beat(step)` after each completed step and wrap checkpoints and evaluations in
    `activity(kind, description)`; when the limit passes, `report` gets one line and the process exits with
    EXIT_STALLED (os._exit: a main thread stuck in a collective cannot unwind)."""

    def __init__(self, rank, step_timeout=0.0, report=None, poll_seconds=1.0):
        self.rank, self.fixed = rank, step_timeout
        self.report = report or (lambda line: console.say(line, sys.stderr))
        self.poll_seconds = poll_seconds
        self.lock = threading.Lock()
        self.recent_steps = collections.deque(maxlen=RECENT_STEPS)
        self.longest = {}  # activity -> its longest interval so far
        self.step = None
        self.first_interval = True
        self.interval_start = time.monotonic()
        self.interval_activities = set()
        self.doing = TRAINING_STEP
        self.paused = False
        self.stopped = threading.Event()
        self.thread = None

    def start(self, step):
        """Arms the watchdog at `step` (None: before the run's start-up), as at a completed step."""
        with self.lock:
            self.step, self.interval_start, self.paused = step, time.monotonic(), False
            self.first_interval, self.interval_activities = True, set()  # the first step traces
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self.thread.start()

    def pause(self):
        """Until the next start(): an elastic reset (Horovod's own timeouts wait for the hosts)."""
        with self.lock:
            self.paused = True

    def stop(self):
        self.stopped.set()

    def beat(self, step):
        """Step `step` completed."""
        with self.lock:
            now = time.monotonic()
            took = now - self.interval_start
            if self.interval_activities:
                for name in self.interval_activities:
                    self.longest[name] = max(self.longest.get(name, 0.0), took)
            elif not self.first_interval:
                self.recent_steps.append(took)
            self.step, self.interval_start = step, now
            self.first_interval = False
            self.interval_activities = set()

    @contextlib.contextmanager
    def activity(self, kind, description):
        """A checkpoint or an evaluation (`kind`: its allowance is measured per kind), entered at
        the same step on every rank; `description` names it if the limit passes inside it."""
        with self.lock:
            self.interval_activities.add(kind)
            self.doing = description
        try:
            yield
        finally:
            with self.lock:
                self.doing = TRAINING_STEP

    def step_limit(self):
        if self.fixed:
            return self.fixed
        slowest = max(self.recent_steps, default=0.0)
        return max(FLOOR_SECONDS, STEP_FACTOR * slowest)

    def limit(self):
        """Seconds the current interval may last."""
        base = self.step_limit()
        limit = base * (FIRST_INTERVAL_FACTOR if self.first_interval else 1.0)
        for name in self.interval_activities:
            limit += ACTIVITY_FACTOR * self.longest[name] if name in self.longest else FIRST_INTERVAL_FACTOR * base
        return limit

    def _watch(self):
        while not self.stopped.wait(self.poll_seconds):
            with self.lock:
                waited, limit, step, doing = (time.monotonic() - self.interval_start, self.limit(), self.step,
                                              self.doing)
                paused = self.paused
            if waited > limit and not paused:
                self._give_up(waited, limit, step, doing)

    def _give_up(self, waited, limit, step, doing):
        # doing: TRAINING_STEP, or the description of the activity under way
        where = (f"in step {'?' if step is None else step + 1} (its collectives wait for a rank that stopped "
                 "answering, unless this rank's own work hangs)" if doing == TRAINING_STEP else f"in {doing}")
        how = "--step_timeout" if self.fixed else "from the run's step times; --step_timeout sets it"
        line = (f"error: rank {self.rank}: no training step completed for {waited:.0f} s, {where}; limit "
                f"{limit:.0f} s ({how}); {RESUMES}")
        self.report(line)
        _mark_stalled(line)
        sys.stdout.flush()
        os._exit(EXIT_STALLED)

    def collective_failed(self, reason):
        """The RankLost to raise when a collective failed after the last completed step."""
        self.stop()
        after = f"after step {self.step}" if self.step is not None else "before the first step"
        line = (f"rank {self.rank}: a Horovod collective failed {after} ({reason}): another rank ended or stopped "
                f"answering; {RESUMES}")
        _mark_stalled(f"error: {line}")
        return RankLost(line)
