"""What asks a training run to save a checkpoint and stop: a signal to this rank, or the end of
the launcher that started it.

Signals: SIGUSR1 (Slurm's warning before the time limit), SIGTERM (scancel, a batch system,
Horovod's Gloo launcher passing on its own end) and SIGINT (Ctrl-C, which mpirun also passes on,
so one press may arrive twice). Later ones change nothing: the checkpoint is on its way; to end
a rank at once, without one, use SIGKILL.

The launcher: `kill` of horovodrun's pid ends that process alone. In MPI mode horovodrun has
become `sh -c mpirun ...`, and mpirun and the ranks under it never hear of it. So each rank
finds, among its ancestors on this host, the outermost launcher process (horovodrun, mpirun, or
the shell running them) and checks at every step that it still lives; when it is gone the rank
stops as if signalled. Ranks on other hosts stop with it: the stop is voted over all ranks.
"""
import os
import signal

LAUNCHERS = ("horovodrun", "mpirun", "mpiexec", "orterun", "prterun")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Process:
    """A process of this host, named by pid and start time, so a reused pid is not taken for it."""

    def __init__(self, pid):
        self.pid = pid
        self.start_time = _stat(pid)[1]
        self.command = _command(pid)

    def alive(self):
        """Running, and the same process: a zombie (ended, its parent has not yet waited for
        it) or a reused pid is gone."""
        try:
            _, start_time, state = _stat(self.pid)
        except OSError:
            return False
        return start_time == self.start_time and state not in ("Z", "X")

    def describe(self):
        """'horovodrun (pid 12)', or 'the shell running mpirun (pid 12)' (horovodrun's MPI mode
        replaces itself by such a shell, under the same pid)."""
        words = self.command.split()
        name = next((os.path.basename(word) for word in words if os.path.basename(word) in LAUNCHERS), "launcher")
        if words and os.path.basename(words[0]) in ("sh", "bash", "dash"):
            return f"the shell running {name} (pid {self.pid})"
        return f"{name} (pid {self.pid})"


def _stat(pid):
    """(parent pid, start time in clock ticks, state letter) of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19]), fields[0]


def _command(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_launcher():
    """The outermost ancestor of this process on this host whose command runs a launcher, or
    None (srun, Slurm's own steps, a plain `python -m`)."""
    launcher, pid = None, os.getppid()
    try:
        while pid > 1:
            command = _command(pid)
            if any(os.path.basename(word) in LAUNCHERS for word in command.split()):
                launcher = pid
            pid = _stat(pid)[0]
        return Process(launcher) if launcher else None
    except OSError:  # an ancestor ended while we looked: watch what was found
        return Process(launcher) if launcher else None


class StopRequests:
    """Installs the signal handlers and finds the launcher; `pending()` says why to stop, or None."""

    def __init__(self):
        self.received = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        try:
            self.launcher = find_launcher()
        except OSError:
            self.launcher = None

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def pending(self):
        """Why this rank should stop ('SIGTERM', 'the end of horovodrun (pid 123)'), or None."""
        if self.received is None and self.launcher is not None and not self.launcher.alive():
            self.received = f"the end of {self.launcher.describe()}"
        return self.received
