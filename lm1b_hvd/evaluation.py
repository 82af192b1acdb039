"""Heldout evaluation with the full softmax: loss sums and word counts, reduced once.

Perplexity is exp(sum of token losses / sum of weights) with both sums taken
over every rank before dividing, so N ranks report the number one process would.
"""
import contextlib
import math

import tensorflow as tf


class Evaluator:
    def __init__(self, model):
        self.model = model
        self.step = tf.function(self._step)

    def _step(self, x, y, w, state):
        outputs, new_state = self.model.forward(x, state, training=False)
        losses = self.model.full_softmax_losses(outputs, y) * w
        return new_state, tf.reduce_sum(losses), tf.reduce_sum(w)

    def sums(self, batches, max_batches=0, ema=None):
        """(loss sum, word count) over `batches` (at most `max_batches` when > 0), row state carried;
        with the EMA's averages swapped into the weights when `ema` is given."""
        state = self.model.zero_state(self.model.hps.batch_size)
        loss_sum, words = 0.0, 0.0
        with ema.swapped_in() if ema else contextlib.nullcontext():
            for index, (x, y, w) in enumerate(batches):
                if max_batches and index >= max_batches:
                    break
                state, batch_loss, batch_words = self.step(x, y, w, state)
                loss_sum += float(batch_loss)
                words += float(batch_words)
        return loss_sum, words


def write_summaries(writer, step, value):
    """The eval/ scalars both the in-loop evaluation and evaluate.py write, under the same tags."""
    with writer.as_default(step=step):
        tf.summary.scalar("eval/perplexity", value)
        tf.summary.scalar("eval/log_perplexity", math.log(value))
    writer.flush()


def perplexity(loss_sum, words):
    if words <= 0:
        raise ValueError("no words were evaluated")
    return math.exp(loss_sum / words)
