"""The dropouts of a training step, each drawn from the step's stateless seed: keep_prob's masks
on the LSTM's inputs and outputs (per step, or per row for the window with variational_dropout),
embedding dropout (emb_keep_prob) and DropConnect on the recurrent weights (recurrent_keep_prob).
They sit outside the LSTMP layer, whose hand-written backward stays the one of ops.py."""
import tensorflow as tf

from lm1b_hvd.model import ops
from lm1b_hvd.model.step_seeds import CANDIDATES_STREAM, RECURRENT_DROPOUT_STREAM, WORD_DROPOUT_STREAM, sub_seed


def dropout(chunks, hps, seed, site):
    """Dropout at `site` (0: the embeddings, k + 1: layer k's outputs) of values given in time
    chunks, its mask drawn from the step's stateless `seed` for all of them at once: the same
    mask, and the same result, as dropout of the values whole. With variational_dropout one
    mask per row [batch, width], which every step of the window shares (Gal and Ghahramani)."""
    if hps.keep_prob >= 1.0:
        return chunks
    steps = 1 if hps.variational_dropout else sum(chunk.shape[0] for chunk in chunks)
    shape = tf.concat([[steps], tf.shape(chunks[0])[1:]], axis=0)
    masks = tf.nn.experimental.stateless_dropout(tf.ones(shape), rate=1.0 - hps.keep_prob,
                                                 seed=sub_seed(seed, CANDIDATES_STREAM + 1 + site))
    if hps.variational_dropout:
        return [chunk * masks for chunk in chunks]
    return [chunk * mask for chunk, mask in zip(chunks, tf.split(masks, [c.shape[0] for c in chunks]))]


def word_keep_scale(hps, vocab_size, seed):
    """Embedding dropout's factor of each word of the vocabulary this step [vocab_size]:
    0 for a dropped word, 1 / emb_keep_prob for a kept one, so every occurrence of a dropped
    word in the batch loses its whole embedding (Merity et al.'s embedding dropout)."""
    return tf.nn.experimental.stateless_dropout(tf.ones([vocab_size]), rate=1.0 - hps.emb_keep_prob,
                                                seed=sub_seed(seed, WORD_DROPOUT_STREAM))


def drop_connect(weights, hps, layer, seed):
    """A layer's weights (ops.LayerWeights) with DropConnect: the recurrent rows of its gate matrix
    masked, one mask for the step's whole window, kept weights scaled by 1 / recurrent_keep_prob
    (Merity et al.'s weight drop). The layer's hand-written backward then gives the masked
    matrix's gradient, which flows back through the mask."""
    if hps.recurrent_keep_prob >= 1.0:
        return weights
    inputs = hps.emb_size if layer == 0 else hps.projected_size
    given, recurrent = ops.split_gate_rows(weights.weight, inputs)
    recurrent = tf.nn.experimental.stateless_dropout(recurrent, rate=1.0 - hps.recurrent_keep_prob,
                                                     seed=sub_seed(seed, RECURRENT_DROPOUT_STREAM + layer))
    return weights._replace(weight=tf.concat([given, recurrent], axis=ops.gate_rows_axis(weights.weight)))
