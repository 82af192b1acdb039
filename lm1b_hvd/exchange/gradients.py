"""The gradient exchange of the original's towers, and what it moves.

Dense (LSTM) gradients are averaged over ranks, sparse (embedding and sampled-softmax) ones
summed, which for IndexedSlices is an allgather of indices and values. The collectives are
exchange.collectives'; this module decides which gradient takes which, and counts the bytes.
"""
import tensorflow as tf

from lm1b_hvd.exchange import collectives

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

    def count(self, local, reduced, fp16_allreduce=False):
        """One gradient's exchange: an IndexedSlices gathered, or a dense tensor allreduced."""
        if isinstance(local, tf.IndexedSlices) and isinstance(reduced, tf.IndexedSlices):
            mine = tensor_bytes(local)
            self.add("allgather", mine, tensor_bytes(reduced) - mine)
        else:
            dense_fp16 = fp16_allreduce and not isinstance(local, tf.IndexedSlices)
            size = tensor_bytes(reduced, itemsize=2 if dense_fp16 else None)
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


class GradientExchange:
    """How the gradients of a step travel between `ranks` (every rank, or a node's in a
    two-level run; hparams fp16_allreduce: the dense
    ones as fp16; sparse_as_dense: the sparse ones allreduced as dense matrices, what Horovod's
    own option does, instead of gathered rows)."""

    def __init__(self, ranks, hps):
        self.ranks = ranks
        self.fp16, self.sparse_as_dense = hps.fp16_allreduce, hps.sparse_as_dense

    def combine(self, gradients, traffic, exchange_sparse=True):
        """Averages dense gradients and sums IndexedSlices over ranks; order is kept. What each
        collective moves is counted into `traffic`. Without `exchange_sparse` the IndexedSlices
        stay as they are (vocabulary-parallel: the exchange already took them to their owners)."""
        if self.ranks.size == 1:
            return list(gradients)
        combined = list(gradients)
        sparse_at = [i for i, g in enumerate(gradients) if isinstance(g, tf.IndexedSlices)]
        dense_at = [i for i in range(len(gradients)) if i not in sparse_at]
        if not exchange_sparse:
            sparse_at = []
        if dense_at:
            averaged = collectives.average_dense([gradients[i] for i in dense_at], self.fp16, self.ranks)
            for i, value in zip(dense_at, averaged):
                combined[i] = value
        if self.sparse_as_dense and sparse_at:
            summed = collectives.sum_dense([tf.convert_to_tensor(gradients[i]) for i in sparse_at], self.ranks)
            for i, value in zip(sparse_at, summed):
                combined[i] = value
        else:
            for i in sparse_at:
                combined[i] = collectives.sum_slices(gradients[i], self.ranks)
        for index in dense_at + sparse_at:
            traffic.count(gradients[index], combined[index], self.fp16)
        return combined

    def tape(self, tape, traffic, local_sources=()):
        """Horovod's DistributedGradientTape around `tape` (grad_combine=tape): everything
        averaged, but `local_sources`, whose gradients stay on the rank (their average where the
        vocabulary's exchange already summed them); what it moves is counted into `traffic`."""
        if self.ranks.size == 1:
            return tape
        return collectives.distributed_tape(tape, self.fp16, self.sparse_as_dense, local_sources,
                                            observe=lambda local, reduced: traffic.count(local, reduced, self.fp16),
                                            ranks=self.ranks)
