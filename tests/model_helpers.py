"""The model's values in the forms tests compare with references: a table's rows as one array, and
the losses with batch-major outputs in, per-token values out (the model itself takes the LSTM's
time-major chunks, as training produces them); and the mark of tests that need the CPU kernels."""
import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd import hparams
from lm1b_hvd.model import cpu_kernels, ops

needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.built(), reason="a GPU install: no CPU kernels built")


def tiny_hparams(**changes):
    """The tiny model of the tests that build one in-process (3 shards, so that a small vocabulary
    pads the last), with `changes`, checked as an --hpconfig would be."""
    base = dict(batch_size=3, num_steps=4, num_shards=3, num_layers=1, emb_size=8, state_size=12, projected_size=6,
                num_sampled=5, keep_prob=1.0)
    return hparams.validate(hparams.HParams(**{**base, **changes}))


def batches_with_a_short_row(hps, steps, seed, draw_ids):
    """`steps` batches (x, y, w) from numpy's generator of `seed`: in each, row 0's sentence ends
    at a random step (its weights 0 after it), and `draw_ids(rng, [batch, steps])` draws x and y."""
    rng = np.random.default_rng(seed)
    shape = (hps.batch_size, hps.num_steps)
    out = []
    for _ in range(steps):
        w = np.ones(shape, np.float32)
        w[0, rng.integers(0, hps.num_steps):] = 0.0
        x, y = draw_ids(rng, shape)
        out.append((x, y, w))
    return out


def whole(table):
    """The rows a tables.VocabTable holds, block after block, as one array (no padding rows)."""
    return np.concatenate([variable.numpy()[:rows.count] for rows, variable in table.blocks])


def sampled_softmax_losses(model, outputs, y, seed=None):
    """The training loss per token [batch, steps] of outputs [batch, steps, projected_size]."""
    chunks = ops.time_chunks(tf.transpose(outputs, [1, 0, 2]), model.plan.time_chunks)
    return model.sampled_losses(chunks, model.softmax_rows(y, seed))


def true_logits(model, outputs, y):
    """The logit the sampled softmax gives each target word: row y of the sharded weights."""
    rows = tf.nn.embedding_lookup(model.softmax_w, y)
    return tf.reduce_sum(outputs * rows, axis=-1) + tf.gather(model.softmax_b, y)
