"""A training step's stateless seed, and the independent seeds of its random draws.

A step's candidates and dropout masks come from a seed keyed by (seed, rank, step) alone, so a
resumed run draws what an unbroken one drew, whatever happened before the checkpoint.
"""
import tensorflow as tf

# Sub-seeds of a step's seed: the sampled candidates, then keep_prob's dropout sites (1 + site);
# embedding dropout and each layer's DropConnect far enough past them for any number of layers.
CANDIDATES_STREAM = 0
WORD_DROPOUT_STREAM = 100_000
RECURRENT_DROPOUT_STREAM = 200_000


def step_seed(seed, rank, step):
    """The stateless seed [2] of rank `rank`'s step `step` (a tensor in a traced step)."""
    return tf.stack([tf.constant(seed * 1_000_003 + rank, tf.int64), tf.cast(step, tf.int64)])


def sub_seed(seed, stream):
    """An independent stateless seed for one use (`stream`) of a step's `seed` [2]."""
    return tf.random.experimental.stateless_fold_in(seed, stream)
