"""Every Horovod call of the project, and nothing else: the one module that imports Horovod.

What the calls are for lives beside it: exchange.gradients (dense gradients averaged, sparse
ones summed, as the original's towers), exchange.vocab_parallel (rows fetched from their
owners), exchange.ranks (the interface library code is handed). Per-row LSTM states are never
communicated.
"""
import contextlib
import os
import re

import horovod
import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.common import elastic as horovod_elastic
from horovod.common.exceptions import HorovodInternalError

from lm1b_hvd import pinned_stack
from lm1b_hvd.exchange.ranks import Ranks


def init(stall_warning_seconds=60.0):
    """Starts Horovod and returns its ranks; gives each process its own GPU (if any) by local
    rank, and sizes TensorFlow's thread pools to the cores this rank owns (before TensorFlow makes
    them). Horovod's stall check warns after `stall_warning_seconds` (naming the ranks missing
    from a collective) unless HOROVOD_STALL_CHECK_TIME_SECONDS says otherwise."""
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(stall_warning_seconds))))
    hvd.init()
    _set_threads_per_rank()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    return HorovodRanks()


def cores_per_rank():
    """The cores this rank may use: its CPU affinity when a launcher bound it (Slurm, mpirun
    --bind-to), else the machine's cores shared out among the ranks on this node."""
    allowed = len(os.sched_getaffinity(0))
    if allowed < (os.cpu_count() or allowed):
        return allowed
    return max(1, allowed // hvd.local_size())


def _set_threads_per_rank():
    """Without this every rank starts one thread per core of the machine, and N ranks on a node
    oversubscribe it N times. TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS still win."""
    cores = cores_per_rank()
    try:
        if "TF_NUM_INTRAOP_THREADS" not in os.environ:
            tf.config.threading.set_intra_op_parallelism_threads(cores)
        if "TF_NUM_INTEROP_THREADS" not in os.environ:
            tf.config.threading.set_inter_op_parallelism_threads(min(cores, 2))
    except RuntimeError:
        pass  # TensorFlow already made its pools (it ran an op before init): they stay as they are


class HorovodRanks(Ranks):
    """Horovod's ranks (after init()); `rank` and `size` are read when asked, since an elastic
    reset changes them."""

    @property
    def rank(self):
        return hvd.rank()

    @property
    def size(self):
        return hvd.size()

    def any(self, flag):
        if hvd.size() == 1:
            return bool(flag)
        return int(hvd.allreduce(tf.constant(int(bool(flag))), op=hvd.Sum, name="any_rank")) > 0

    def root_decides(self, value):
        if hvd.size() == 1:
            return value
        return hvd.broadcast_object(value, root_rank=0, name="root_decides")

    def gather_objects(self, value):
        if hvd.size() == 1:
            return [value]
        return hvd.allgather_object(value, name="gather_objects")

    def gather_numbers(self, numbers):
        values = tf.constant([numbers], tf.float64)
        if hvd.size() > 1:
            values = hvd.allgather(values)
        return [float(v) for v in tf.reshape(values, [-1]).numpy()]

    def sum(self, tensor):
        if hvd.size() == 1:
            return tensor
        return hvd.allreduce(tensor, op=hvd.Sum)

    def broadcast_from_root(self, variables):
        """Horovod's in-place broadcast, one variable at a time, so no copy of a weight is made.
        Broadcasting them all at once, in place or not, holds a second copy of every weight (for
        the default model and its slots, more than a rank's memory can spare); assigning blocks
        of rows copies the whole variable at every block, since TensorFlow copies a sparsely
        read variable on write."""
        if hvd.size() == 1:
            return
        for variable in variables:
            hvd.broadcast_([variable], root_rank=0)


# The gradient exchange's collectives (exchange.gradients decides which goes where).

def average_dense(tensors, fp16=False):
    """The average over ranks of each dense tensor, in one grouped allreduce (sent as fp16 when asked)."""
    return hvd.grouped_allreduce(tensors, op=hvd.Average,
                                 compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none)


def sum_dense(tensors):
    """The sum over ranks of each dense tensor, in one grouped allreduce."""
    return hvd.grouped_allreduce(tensors, op=hvd.Sum)


def sum_slices(slices):
    """The sum over ranks of an IndexedSlices: every rank's rows, gathered (duplicates kept)."""
    return hvd.allreduce(slices, op=hvd.Sum)


def distributed_tape(tape, fp16=False, sparse_as_dense=False, local_sources=(), observe=None):
    """Horovod's DistributedGradientTape around `tape`: everything averaged, as Horovod users
    expect, but for `local_sources`, whose gradients Horovod leaves on the rank and divides by
    the rank count. `observe(local, reduced)` sees every gradient it reduces."""
    reducing = hvd.DistributedGradientTape(tape, compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
                                           sparse_as_dense=sparse_as_dense)
    for source in local_sources:
        reducing.register_local_source(source)
    return pinned_stack.observe_tape_reduction(reducing, observe) if observe else reducing


# The vocabulary's exchange (exchange.vocab_parallel says what moves).

def alltoall(tensor, splits):
    """Rows `splits[r]` of `tensor` to rank r, in rank order: (what came back, its splits)."""
    return hvd.alltoall(tensor, splits=splits)


def allgather(tensor):
    """Every rank's `tensor`, concatenated in rank order along the first axis."""
    return hvd.allgather(tensor)


# What the run tells about the exchange.

def exchange_description(on_gpu):
    """How Horovod moves gradients in this run, e.g. '0.28.1, Gloo controller, gradients exchanged
    with NCCL 2.16.5 on the GPUs'."""
    controller = "MPI" if hvd.mpi_enabled() else "Gloo" if hvd.gloo_enabled() else "no"
    if hvd.size() == 1:
        return f"{horovod.__version__}, 1 rank: no exchange"
    if on_gpu and hvd.nccl_built():
        nccl = hvd.nccl_built()
        return (f"{horovod.__version__}, {controller} controller, gradients exchanged with "
                f"NCCL {nccl // 10000}.{nccl // 100 % 100}.{nccl % 100} on the GPUs")
    where = "GPU tensors copied through the host" if on_gpu else "on the CPU"
    return f"{horovod.__version__}, {controller} controller, gradients exchanged with {controller} ({where})"


def device_report(ranks, description, on_gpu):
    """Lines for rank 0 to print at start: where each rank trains, and how gradients travel (a
    collective: every rank calls it)."""
    lines = [f"device rank {rank}: {where}" for rank, where in enumerate(ranks.gather_objects(description))]
    return lines + [f"horovod: {exchange_description(on_gpu)}"]


# Failures, and Horovod's elastic mode.

class CollectiveFailed(Exception):
    """A Horovod collective failed: Horovod shut down after another rank ended or stopped
    answering (Gloo gives up on a silent peer after HOROVOD_GLOO_TIMEOUT_SECONDS)."""


def _is_horovod_failure(err):
    return isinstance(err, tf.errors.UnknownError) and "Horovod" in err.message


@contextlib.contextmanager
def collectives_fail_as_one_error():
    """Within the block, a failed collective is CollectiveFailed naming the kind of op and
    the cause ('HorovodAllgather: Timed out waiting 30000ms for recv operation to complete')
    instead of TensorFlow's traceback of the traced step."""
    try:
        yield
    except HorovodInternalError as err:
        raise CollectiveFailed(str(err).split(". ")[0]) from None
    except tf.errors.UnknownError as err:
        if not _is_horovod_failure(err):
            raise
        raise CollectiveFailed(_failure_cause(err.message)) from None


def _failure_cause(message):
    """The op kind and the cause in a failed Horovod op's message: the cause is the line
    before TensorFlow's '[[{{node HorovodAllgather_...}}]]', without its source location."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    at = next((index for index, line in enumerate(lines) if "{{node Horovod" in line), None)
    if at is None:
        return lines[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[at - 1] if at > 0 else "").split(". ")[0]
    kind = re.search(r"\{\{node (Horovod[A-Za-z]+)", lines[at]).group(1)
    return f"{kind}: {cause}" if cause else kind


class ElasticState(horovod_elastic.State):
    """Horovod elastic state of a list of variables: commit() copies them to host memory, a
    reset after a lost rank puts that copy back, and sync() gives every rank rank 0's values
    (in place, as HorovodRanks.broadcast_from_root). Horovod's own TensorFlowState broadcasts
    nothing on a reset under TF2's eager mode, hence this one. `restart_point` is where the
    caller's training function starts when Horovod (re)runs it; the caller's reset callbacks set it."""

    def __init__(self, variables, restart_point=None):
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.variables = list(variables)
        self.restart_point = restart_point
        self.save()

    def save(self):
        self._values = [variable.numpy() for variable in self.variables]

    def restore(self):
        for variable, value in zip(self.variables, self._values):
            variable.assign(value)

    def sync(self):
        HorovodRanks().broadcast_from_root(self.variables)
        self.save()


def elastic_run(train):
    """Horovod's elastic retry loop around `train(state)`: when a rank is lost, the survivors
    restore the last commit, restart Horovod with the ranks that remain, run the state's reset
    callbacks and call `train` again. A collective that fails inside a tf.function surfaces as
    tf.errors.UnknownError naming a Horovod op: that is the signal to reset."""
    def failing_collectives_reset(state, *args, **kwargs):
        try:
            return train(state, *args, **kwargs)
        except tf.errors.UnknownError as err:
            if _is_horovod_failure(err):
                raise HorovodInternalError(err) from None
            raise

    return horovod_elastic.run_fn(failing_collectives_reset, _restart_horovod)


def _restart_horovod():
    hvd.shutdown()
    hvd.init()
