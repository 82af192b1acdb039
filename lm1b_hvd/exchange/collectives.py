"""Every Horovod call of the project, and nothing else: the one module that imports Horovod.

What the calls are for lives beside it: exchange.gradients (dense gradients averaged, sparse
ones summed, as the original's towers), exchange.vocab_parallel (rows fetched from their
owners), lm1b_hvd.ranks (the interface library code is handed). Per-row LSTM states are never
communicated.
"""
import contextlib
import os
import socket
import typing

import horovod
import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.common import elastic as horovod_elastic
from horovod.common.exceptions import HorovodInternalError

from lm1b_hvd import pinned_stack
from lm1b_hvd.ranks import Ranks


def init(stall_warning_seconds=60.0, process_sets=False):
    """Starts Horovod and returns its ranks; gives each process its own GPU (if any) by local
    rank, and sizes TensorFlow's thread pools to the cores this rank owns (before TensorFlow makes
    them). Horovod's stall check warns after `stall_warning_seconds` (naming the ranks missing
    from a collective) unless HOROVOD_STALL_CHECK_TIME_SECONDS says otherwise. `process_sets`:
    Horovod may be asked for process sets later (node_groups)."""
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(stall_warning_seconds))))
    hvd.init(process_sets="dynamic" if process_sets else None)
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
    """Horovod's ranks (after init()), or those of one of its process sets; `rank` and `size`
    are read when asked, since an elastic reset changes them. Collectives of the project's own
    decisions (any, root_decides, the gathers) are taken over every rank."""

    def __init__(self, process_set=None):
        self.process_set = process_set or hvd.global_process_set

    @property
    def rank(self):
        return self.process_set.rank()

    @property
    def size(self):
        return self.process_set.size()

    @property
    def global_ranks(self):
        """The global ranks of this set, in its rank order."""
        return list(self.process_set.ranks) if self.process_set.ranks else list(range(hvd.size()))

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
        if self.size == 1:
            return tensor
        return hvd.allreduce(tensor, op=hvd.Sum, process_set=self.process_set)

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


# Nodes: the two levels of a two-level run (update.outer, run.modes).

class NodeGroups(typing.NamedTuple):
    """The two levels of a run across nodes: `node`, the ranks of this rank's node, which
    exchange every step; `across`, the ranks at this rank's position in every node, which hold
    the same parameters and meet at outer steps; `count` nodes, of which this is number `index`."""
    node: Ranks
    across: Ranks
    count: int
    index: int


def node_membership(ranks_per_node=0):
    """The node of every global rank, numbered from 0 in order of first appearance: the ranks
    of each host form a node (Horovod's hosts, as `horovodrun -H` or Slurm placed them), or, with
    `ranks_per_node` K, ranks 0..K-1, K..2K-1, ... do (simulated nodes on one host). Every node
    must hold as many ranks (ValueError). A collective: every rank calls it."""
    size = hvd.size()
    if ranks_per_node:
        if size % ranks_per_node:
            raise ValueError(f"--ranks_per_node {ranks_per_node} does not divide the {size} ranks")
        return [r // ranks_per_node for r in range(size)]
    hosts = hvd.allgather_object(socket.gethostname(), name="node_hosts") if size > 1 else [socket.gethostname()]
    first_seen = list(dict.fromkeys(hosts))
    node_of = [first_seen.index(host) for host in hosts]
    counts = [node_of.count(node) for node in range(len(first_seen))]
    if len(set(counts)) > 1:
        raise ValueError("the nodes hold unequal numbers of ranks (" + ", ".join(map(str, counts)) + ")")
    return node_of


def node_groups(node_of):
    """The NodeGroups of this rank for the membership `node_of` (node_membership's, of more than
    one node): Horovod makes a process set of each node and one of each position within a node
    across the nodes, in the same order on every rank (a collective; needs
    init(process_sets=True))."""
    members = [[r for r in range(len(node_of)) if node_of[r] == node] for node in range(max(node_of) + 1)]
    node_sets = [_process_set(ranks) for ranks in members]
    across_sets = [_process_set([ranks[position] for ranks in members]) for position in range(len(members[0]))]
    mine = node_of[hvd.rank()]
    return NodeGroups(node=HorovodRanks(node_sets[mine]),
                      across=HorovodRanks(across_sets[members[mine].index(hvd.rank())]), count=len(members),
                      index=mine)


_PROCESS_SETS = {}  # the sets made so far, by their ranks: Horovod will not make one twice


def _process_set(ranks):
    """Horovod's process set of these global ranks (all of them: its global set); one made
    before is used again (a second training stack in the same processes, as tests make)."""
    if len(ranks) == hvd.size():
        return hvd.global_process_set
    if tuple(ranks) not in _PROCESS_SETS:
        _PROCESS_SETS[tuple(ranks)] = hvd.add_process_set(ranks)
    return _PROCESS_SETS[tuple(ranks)]


def _set(ranks):
    """The Horovod process set of `ranks` (a HorovodRanks), all ranks for anything else."""
    return getattr(ranks, "process_set", None) or hvd.global_process_set


# The gradient exchange's collectives (exchange.gradients decides which goes where). `ranks`:
# the ranks taking part (a HorovodRanks of a process set), every rank by default.

def average_dense(tensors, fp16=False, ranks=None):
    """The average over ranks of each dense tensor, in one grouped allreduce (sent as fp16 when asked)."""
    return hvd.grouped_allreduce(tensors, op=hvd.Average, process_set=_set(ranks),
                                 compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none)


def sum_dense(tensors, ranks=None):
    """The sum over ranks of each dense tensor, in one grouped allreduce."""
    return hvd.grouped_allreduce(tensors, op=hvd.Sum, process_set=_set(ranks))


def sum_slices(slices, ranks=None):
    """The sum over ranks of an IndexedSlices: every rank's rows, gathered (duplicates kept)."""
    return hvd.allreduce(slices, op=hvd.Sum, process_set=_set(ranks))


def maximum(tensor, ranks=None):
    """Per element, the largest over ranks (an allreduce)."""
    return hvd.allreduce(tensor, op=hvd.Max, process_set=_set(ranks))


def broadcast_tensors(tensors, root, ranks):
    """Each tensor as the global rank `root` of `ranks` holds it (Horovod names roots by global rank)."""
    return [hvd.broadcast(tensor, root_rank=root, process_set=_set(ranks)) for tensor in tensors]


def distributed_tape(tape, fp16=False, sparse_as_dense=False, local_sources=(), observe=None, ranks=None):
    """Horovod's DistributedGradientTape around `tape`: everything averaged, as Horovod users
    expect, but for `local_sources`, whose gradients Horovod leaves on the rank and divides by
    the rank count. `observe(local, reduced)` sees every gradient it reduces."""
    reducing = hvd.DistributedGradientTape(tape, compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
                                           sparse_as_dense=sparse_as_dense, process_set=_set(ranks))
    for source in local_sources:
        reducing.register_local_source(source)
    return pinned_stack.observe_tape_reduction(reducing, observe) if observe else reducing


# The vocabulary's exchange (exchange.vocab_parallel says what moves).

def alltoall(tensor, splits, ranks=None):
    """Rows `splits[r]` of `tensor` to rank r, in rank order: (what came back, its splits)."""
    return hvd.alltoall(tensor, splits=splits, process_set=_set(ranks))


def allgather(tensor, ranks=None):
    """Every rank's `tensor`, concatenated in rank order along the first axis."""
    return hvd.allgather(tensor, process_set=_set(ranks))


class Across:
    """The collectives of an outer step (update.outer_exchange) over `ranks` (a HorovodRanks of
    the set across the nodes): its rank and size, and the collectives it needs."""

    def __init__(self, ranks):
        self.ranks = ranks

    @property
    def rank(self):
        return self.ranks.rank

    @property
    def size(self):
        return self.ranks.size

    def maximum(self, tensor):
        return maximum(tensor, self.ranks)

    def average(self, tensors, fp16=False):
        return average_dense(tensors, fp16=fp16, ranks=self.ranks)

    def alltoall(self, tensor, splits):
        return alltoall(tensor, splits, self.ranks)

    def allgather(self, tensor):
        return allgather(tensor, self.ranks)


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
        if not pinned_stack.is_horovod_failure(err):
            raise
        raise CollectiveFailed(pinned_stack.horovod_failure_cause(err.message)) from None


class ElasticState(pinned_stack.horovod_elastic_state(horovod_elastic, hvd.broadcast_object, hvd.rank)):
    """Horovod elastic state of a list of variables: commit() copies them to host memory, a
    reset after a lost rank puts that copy back, and sync() gives every rank rank 0's values
    (in place, as HorovodRanks.broadcast_from_root). Horovod's own TensorFlowState broadcasts
    nothing on a reset under TF2's eager mode, hence this one. `restart_point` is where the
    caller's training function starts when Horovod (re)runs it; the caller's reset callbacks set it."""

    def __init__(self, variables, restart_point=None):
        super().__init__()
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
            if pinned_stack.is_horovod_failure(err):
                raise HorovodInternalError(err) from None
            raise

    return pinned_stack.elastic_retry_loop(horovod_elastic, failing_collectives_reset, _restart_horovod)


def _restart_horovod():
    hvd.shutdown()
    hvd.init()
