"""Every Horovod call of the project, and nothing else.

Combining gradients follows the original multi-tower trainer: dense (LSTM)
gradients are averaged over ranks, sparse (embedding and sampled-softmax)
gradients are summed, which for IndexedSlices is an allgather of indices and
values. Per-row LSTM states are never communicated.
"""
import contextlib
import os
import re

import horovod
import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.common import elastic as horovod_elastic
from horovod.common.exceptions import HorovodInternalError

from lm1b_hvd import console, tables


def init(stall_warning_seconds=60.0):
    """Starts Horovod, gives each process its own GPU (if any) by local rank, and sizes
    TensorFlow's thread pools to the cores this rank owns (before TensorFlow makes them).
    Horovod's stall check warns after `stall_warning_seconds` (naming the ranks that are
    missing from a collective) unless HOROVOD_STALL_CHECK_TIME_SECONDS says otherwise."""
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(stall_warning_seconds))))
    hvd.init()
    _set_threads_per_rank()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")


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


def rank():
    return hvd.rank()


def size():
    return hvd.size()


def is_root():
    return hvd.rank() == 0


def _compression(hps):
    return hvd.Compression.fp16 if hps.fp16_allreduce else hvd.Compression.none


TRAFFIC_KINDS = ("allreduce", "allgather", "alltoall")


class Traffic:
    """Bytes this rank moves through Horovod's collectives in one step, per kind of op, counted
    from the tensors: `sent`, what it hands in for the other ranks, and `received`, what comes
    back from them. An allreduce's tensor counts whole both ways (a ring moves about twice it
    over each rank's links, whatever the rank count); a rank's own rows of an allgather stay on
    the rank and count for neither."""

    def __init__(self):
        self.bytes = {f"{kind}_{way}": tf.constant(0.0) for kind in TRAFFIC_KINDS for way in ("sent", "received")}

    def add(self, kind, sent, received):
        self.bytes[f"{kind}_sent"] += sent
        self.bytes[f"{kind}_received"] += received

    def count(self, local, reduced, hps):
        """One gradient's exchange: an IndexedSlices gathered, or a dense tensor allreduced."""
        if isinstance(local, tf.IndexedSlices) and isinstance(reduced, tf.IndexedSlices):
            mine = tensor_bytes(local)
            self.add("allgather", mine, tensor_bytes(reduced) - mine)
        else:
            size = tensor_bytes(reduced, itemsize=2 if hps.fp16_allreduce and not isinstance(local, tf.IndexedSlices)
                                else None)
            self.add("allreduce", size, size)


def tensor_bytes(tensor, itemsize=None):
    """Bytes of a tensor, or of an IndexedSlices' values and indices; `itemsize` overrides the
    values' (fp16 compression sends 2-byte values)."""
    parts = [tensor.values, tensor.indices] if isinstance(tensor, tf.IndexedSlices) else [tensor]
    total = tf.constant(0.0)
    for index, part in enumerate(parts):
        size = itemsize if itemsize and index == 0 else part.dtype.size
        total += tf.cast(tf.size(part), tf.float32) * size
    return total


def combine_gradients(gradients, hps, traffic, exchange_sparse=True):
    """Averages dense gradients and sums IndexedSlices over ranks; order is kept. What each
    collective moves is counted into `traffic`. Without `exchange_sparse` the IndexedSlices
    stay as they are (vocabulary-parallel: the exchange already took them to their owners).

    `hps.fp16_allreduce` sends the dense ones as fp16; `hps.sparse_as_dense` allreduces the
    sparse ones as dense matrices (what Horovod's own option does) instead of allgathering rows."""
    if hvd.size() == 1:
        return list(gradients)
    combined = list(gradients)
    sparse_at = [i for i, g in enumerate(gradients) if isinstance(g, tf.IndexedSlices)]
    dense_at = [i for i in range(len(gradients)) if i not in sparse_at]
    if not exchange_sparse:
        sparse_at = []
    if dense_at:
        averaged = hvd.grouped_allreduce([gradients[i] for i in dense_at], op=hvd.Average,
                                         compression=_compression(hps))
        for i, value in zip(dense_at, averaged):
            combined[i] = value
    if hps.sparse_as_dense and sparse_at:
        summed = hvd.grouped_allreduce([tf.convert_to_tensor(gradients[i]) for i in sparse_at], op=hvd.Sum)
        for i, value in zip(sparse_at, summed):
            combined[i] = value
    else:
        for i in sparse_at:
            combined[i] = hvd.allreduce(gradients[i], op=hvd.Sum)
    for index in dense_at + sparse_at:
        traffic.count(gradients[index], combined[index], hps)
    return combined


def gradient_tape(tape, hps, traffic, local_sources=()):
    """Horovod's DistributedGradientTape around `tape`: everything averaged, as Horovod users
    expect, but for `local_sources`, whose gradients Horovod leaves on the rank and divides by
    the rank count (their average where the exchange already summed them). Its reduction of the
    gradients is wrapped to count what it moves into `traffic` (the tape keeps the local
    gradients to itself otherwise)."""
    if hvd.size() == 1:
        return tape
    distributed_tape = hvd.DistributedGradientTape(tape, compression=_compression(hps),
                                                   sparse_as_dense=hps.sparse_as_dense)
    for source in local_sources:
        distributed_tape.register_local_source(source)
    reduce = distributed_tape._allreduce_grads  # Horovod 0.28's own reduction of the tape's gradients

    def reduce_and_count(gradients, sources, *args):
        reduced = reduce(gradients, sources, *args)
        for local, result in zip(gradients, reduced):
            if local is not None:
                traffic.count(local, result, hps)
        return reduced

    distributed_tape._allreduce_grads = reduce_and_count
    return distributed_tape


def sum_over_ranks(tensor):
    """Elementwise sum of a tensor over all ranks (sums first, divide once)."""
    if hvd.size() == 1:
        return tensor
    return hvd.allreduce(tensor, op=hvd.Sum)


def gather_objects(value):
    """Every rank's picklable `value`, rank by rank, on every rank."""
    if hvd.size() == 1:
        return [value]
    return hvd.allgather_object(value, name="gather_objects")


def device_report(description, on_gpu):
    """Lines for rank 0 to print at start: where each rank trains, and how gradients travel."""
    lines = [f"device rank {rank}: {where}" for rank, where in enumerate(gather_objects(description))]
    return lines + [f"horovod: {exchange_description(on_gpu)}"]


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


def any_rank(flag):
    """Whether `flag` is true on any rank (a collective: every rank calls it)."""
    if hvd.size() == 1:
        return bool(flag)
    return int(hvd.allreduce(tf.constant(int(bool(flag))), op=hvd.Sum, name="any_rank")) > 0


def root_decides(value):
    """Rank 0's picklable `value`, on every rank."""
    if hvd.size() == 1:
        return value
    return hvd.broadcast_object(value, root_rank=0, name="root_decides")


def in_lockstep(items, filler):
    """`items`, then `filler` for as long as another rank still has items of its own: for a loop
    of collectives that every rank must run as often (a vocabulary-parallel evaluation over
    shares of unequal length). One small allreduce per item."""
    items = iter(items)
    while True:
        item = next(items, None)
        if not any_rank(item is not None):
            return
        yield filler if item is None else item


def gather_numbers(numbers):
    """Every rank's list of numbers, rank by rank, on every rank (a host-side allgather)."""
    values = tf.constant([numbers], tf.float64)
    if hvd.size() > 1:
        values = hvd.allgather(values)
    return [float(v) for v in tf.reshape(values, [-1]).numpy()]


def broadcast_from_root(variables):
    """Makes every rank hold rank 0's values of `variables`: Horovod's in-place broadcast, one
    variable at a time, so no copy of a weight is made. Broadcasting them all at once, in place
    or not, holds a second copy of every weight (for the default model and its slots, more than
    a rank's memory can spare); assigning blocks of rows copies the whole variable at every
    block, since TensorFlow copies a sparsely read variable on write."""
    if hvd.size() == 1:
        return
    for variable in variables:
        hvd.broadcast_([variable], root_rank=0)


class ElasticState(horovod_elastic.State):
    """Horovod elastic state of a list of variables: commit() copies them to host memory, a
    reset after a lost rank puts that copy back, and sync() gives every rank rank 0's values
    (in place, as broadcast_from_root). Horovod's own TensorFlowState broadcasts nothing on
    a reset under TF2's eager mode, hence this one. `restart_point` is where the caller's
    training function starts when Horovod (re)runs it; the caller's reset callbacks set it."""

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
        broadcast_from_root(self.variables)
        self.save()


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


class VocabularyTooSmall(console.UserError):
    pass


def vocab_exchange(hps, vocab_size):
    """The VocabExchange of a vocabulary-parallel run (hparam vocab_parallel), else None."""
    if not hps.vocab_parallel:
        return None
    if vocab_size < hvd.size():
        raise VocabularyTooSmall(f"vocab_parallel=true needs at least one vocabulary row per rank: {vocab_size} "
                                 f"row(s) for {hvd.size()} ranks")
    return VocabExchange(vocab_size)


class VocabExchange:
    """The collectives of a vocabulary sharded over the ranks (hparam vocab_parallel). Rank r
    holds the contiguous rows tables.owned_rows(vocab, r, ranks) of the embedding and of the
    softmax's weights and biases, with their Adagrad slots. A step fetches the rows it needs
    (each unique) from their owners with Horovod's alltoall; the alltoall's gradient is an
    alltoall back, so the rows' gradients reach their owners, who sum what every rank sent.
    The full softmax of an evaluation is taken over the ranks' shares: each rank computes its
    rows' logits for every rank's outputs, and the log-sum-exps are combined."""

    def __init__(self, vocab_size):
        self.vocab_size, self.rank, self.ranks = vocab_size, hvd.rank(), hvd.size()
        self.rows = tables.owned_rows(vocab_size, self.rank, self.ranks)

    def fetch(self, matrices, ids, traffic=None):
        """Rows `ids` (unique, int64 [n]) of the vocabulary-wide matrices whose shares here are
        `matrices` ([rows held, width] or [rows held]), side by side: [n, sum of widths]."""
        owner = tables.owners(ids, self.vocab_size, self.ranks)
        order = tf.argsort(owner, stable=True)  # alltoall sends rank by rank
        splits = tf.math.bincount(owner, minlength=self.ranks, maxlength=self.ranks, dtype=tf.int32)
        requested, requested_splits = hvd.alltoall(tf.gather(ids, order), splits=splits)
        local = requested - self.rows.first
        gathered = [tf.gather(matrix, local) for matrix in matrices]
        sent = tf.concat([rows if rows.shape.rank == 2 else rows[:, None] for rows in gathered], axis=1)
        rows, _ = hvd.alltoall(sent, splits=requested_splits)
        if traffic is not None:
            self._count(traffic, splits, requested_splits, sent)
        return tf.gather(rows, tf.math.invert_permutation(order))

    def _count(self, traffic, splits, requested_splits, sent):
        """The ids out, the rows back, and in the backward the rows' gradients out again: what
        a rank asks of itself does not leave it."""
        width = tf.cast(tf.shape(sent)[1], tf.float32) * sent.dtype.size
        asked = tf.cast(tf.reduce_sum(splits) - splits[self.rank], tf.float32)
        answered = tf.cast(tf.reduce_sum(requested_splits) - requested_splits[self.rank], tf.float32)
        traffic.add("alltoall", asked * 8 + answered * width + asked * width,
                    answered * 8 + asked * width + answered * width)

    def full_softmax_losses(self, outputs, targets, weights, biases):
        """Cross-entropy [batch] of this rank's outputs [batch, dim] and targets over the whole
        vocabulary, from the shares `weights` [rows held, dim] and `biases` of every rank. Every
        rank calls it with the same batch size."""
        every_output = hvd.allgather(outputs)
        every_target = tf.cast(hvd.allgather(targets), tf.int64)
        logits = tf.matmul(every_output, weights, transpose_b=True) + biases
        shares = tf.reshape(hvd.allgather(tf.reduce_logsumexp(logits, axis=1)), [self.ranks, -1])
        log_sum_exp = tf.reduce_logsumexp(shares, axis=0)
        local = every_target - self.rows.first
        held = (local >= 0) & (local < self.rows.count)
        target_logits = tf.where(held, tf.gather(logits, tf.clip_by_value(local, 0, self.rows.count - 1),
                                                 batch_dims=1), 0.0)
        losses = log_sum_exp - hvd.allreduce(target_logits, op=hvd.Sum)
        batch = tf.shape(outputs)[0]
        return losses[self.rank * batch:(self.rank + 1) * batch]
