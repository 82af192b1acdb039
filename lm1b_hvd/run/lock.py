"""A log directory belongs to one training run at a time: rank 0 holds an OS lock on L/run.lock.

The lock is a POSIX record lock (fcntl), which the kernel drops when its process ends in any
way (kill -9 included), so a dead run never leaves a directory locked. NFS clients forward
these locks to the server's lock manager (NFSv3's lockd, NFSv4's own state), so they hold
across nodes; a node lost without a goodbye keeps its lock until the server's lease expires
(NFSv4: 90 s by default). Lustre honours them across nodes only when mounted with `-o flock`
(with `localflock` they hold on one node only, with `noflock` taking them fails).

A POSIX lock is the process's, not the descriptor's: closing any descriptor of the file drops
it, so nothing else in the training process may open the lock file.

The file also tells who holds it (host, pid, since when), as one JSON line, for the error a
second run prints and for `lm1b_hvd.status`. Readers never take the lock: they ask the kernel
whether it is held (F_GETLK), which waits for nothing and changes nothing.
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import struct

from lm1b_hvd import console
from lm1b_hvd.run.logdir_files import LOCK_FILE


class LogdirInUse(console.UserError):
    """Another run holds the log directory."""


class LockUnavailable(console.UserError):
    """The lock file cannot be made or locked (a read-only or full file system, no lock support)."""


def lock_path(logdir):
    return os.path.join(logdir, LOCK_FILE)


def describe_holder(holder):
    """'pid 1234 on host node7 since 2026-12-02 07:10:00 UTC' of a holder record."""
    if not holder:
        return "an unknown process (the lock file names none)"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


class RunLock:
    """The exclusive lock of one log directory, held from acquire() until release() or the end
    of the process. Only the process holding it may write into the directory."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.path = lock_path(logdir)
        self.handle = None

    @property
    def held(self):
        return self.handle is not None

    def acquire(self):
        """Takes the lock without waiting and writes this process into the file; a held lock is
        LogdirInUse naming the holder, and nothing is written."""
        if self.held:
            return
        if os.path.exists(self.logdir) and not os.path.isdir(self.logdir):
            raise LockUnavailable(f"{self.logdir}: the log directory is a file")
        try:
            os.makedirs(self.logdir, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LockUnavailable(f"{self.path}: cannot open the run's lock file ({err.strerror}); the log directory "
                                  "must be writable") from None
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _parse(handle.read())
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise LogdirInUse(f"{self.logdir}: in use by another training run, {describe_holder(holder)} "
                                  f"({self.path}); stop that run or use another --logdir") from None
            raise LockUnavailable(f"{self.path}: cannot lock ({err.strerror}; on Lustre mount with -o flock)") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(_this_process()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as err:
            handle.close()
            raise LockUnavailable(f"{self.path}: cannot write the run's lock file ({err.strerror})") from None
        self.handle = handle

    def release(self):
        """Gives the lock up (an elastic reset made another process rank 0). The file stays: it
        names the last holder."""
        if self.handle is not None:
            self.handle.close()  # closing drops the process's record locks on the file
            self.handle = None


def _this_process():
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}


def _parse(text):
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_holder(logdir):
    """(held, record): whether a process holds the lock of `logdir` now, and the holder the file
    names (the current one when held, else the last one; None without a file). Takes nothing."""
    path = lock_path(logdir)
    try:
        with open(path) as handle:
            record = _parse(handle.read())
            held = _is_locked(handle)
    except FileNotFoundError:
        return False, None
    return held, record


def _is_locked(handle):
    """Whether another process holds a write lock on the file: F_GETLK, which only asks."""
    # struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padding
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    answer = fcntl.fcntl(handle, fcntl.F_GETLK, query)
    return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK
