"""Every Horovod call of the project, and nothing else.

Combining gradients follows the original multi-tower trainer: dense (LSTM)
gradients are averaged over ranks, sparse (embedding and sampled-softmax)
gradients are summed, which for IndexedSlices is an allgather of indices and
values. Per-row LSTM states are never communicated.
"""
import horovod.tensorflow as hvd
import tensorflow as tf


def init():
    """Starts Horovod and gives each process its own GPU (if any) by local rank."""
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")


def rank():
    return hvd.rank()


def size():
    return hvd.size()


def is_root():
    return hvd.rank() == 0


def combine_gradients(gradients):
    """Averages dense gradients and sums IndexedSlices over ranks; order is kept."""
    if hvd.size() == 1:
        return list(gradients)
    dense_at = [i for i, g in enumerate(gradients) if not isinstance(g, tf.IndexedSlices)]
    combined = list(gradients)
    if dense_at:
        averaged = hvd.grouped_allreduce([gradients[i] for i in dense_at], op=hvd.Average)
        for i, value in zip(dense_at, averaged):
            combined[i] = value
    for i, gradient in enumerate(gradients):
        if isinstance(gradient, tf.IndexedSlices):
            combined[i] = hvd.allreduce(gradient, op=hvd.Sum)
    return combined


def sum_over_ranks(tensor):
    """Elementwise sum of a tensor over all ranks (sums first, divide once)."""
    if hvd.size() == 1:
        return tensor
    return hvd.allreduce(tensor, op=hvd.Sum)


def broadcast_from_root(variables):
    """Makes every rank hold rank 0's values of `variables`."""
    if hvd.size() > 1:
        hvd.broadcast_variables(variables, root_rank=0)
