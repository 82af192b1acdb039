"""Heldout evaluation with the full softmax: loss sums and word counts, reduced once.

Perplexity is exp(sum of token losses / sum of weights) with both sums taken
over every rank before dividing, so N ranks report the number one process would.
"""
import contextlib
import itertools
import math

import numpy as np
import tensorflow as tf

from lm1b_hvd import console
from lm1b_hvd.data.dataset import DataError, pack_batches
from lm1b_hvd.ranks import ONE_PROCESS
from lm1b_hvd.model.averaging import evaluation_weights
from lm1b_hvd.run.checkpoints import first_line


class Evaluator:
    """Full-softmax loss sums of a model, with the EMA weights (`ema`) when the run averages
    them (model.averaging.evaluation_weights); `ema=None` evaluates the weights the model holds.
    `ranks`: the processes whose shares of a split add up (each evaluates its own)."""

    def __init__(self, model, ema, ranks=ONE_PROCESS, report=None):
        self.model = model
        self.ema = ema
        self.ranks = ranks
        self.report = report  # where progress lines of a long evaluation go (None: nowhere)
        self.step = tf.function(self._step)

    def _step(self, x, y, w, state):
        outputs, new_state = self.model.forward(x, state, training=False)
        losses = self.model.full_softmax_losses(outputs, y) * w
        return new_state, tf.reduce_sum(losses), tf.reduce_sum(w)

    def sums(self, sentences, max_batches=0):
        """(loss sum, word count) over `sentences` (id arrays `<S> .. <S>`) laid back to back in
        the run's batch rows, row state carried; at most `max_batches` batches when > 0."""
        hps = self.model.hps
        if max_batches:  # a cap: the sentences are streamed, the progress lines' total is the cap
            total = max_batches * hps.batch_size * hps.num_steps
        else:  # a whole split is read into memory (a heldout split is small) and counted there
            sentences = list(sentences)
            total = sum(len(sentence) - 1 for sentence in sentences)
        meter = console.Meter("evaluation (full softmax)", total, "words", report=self.report or (lambda _: None))
        state = self.model.zero_state(hps.batch_size)
        loss_sum, words = 0.0, 0.0
        averaged = evaluation_weights(self.ema, hps) if self.ema else contextlib.nullcontext()
        batches = pack_batches(sentences, hps.batch_size, hps.num_steps)
        if max_batches:
            batches = itertools.islice(batches, max_batches)
        if self.model.vocab_parallel:  # every batch's softmax is every rank's: ranks keep in step
            blank = np.zeros([hps.batch_size, hps.num_steps], np.int32)
            batches = self.ranks.in_lockstep(batches, (blank, blank, blank.astype(np.float32)))
        with averaged:
            for x, y, w in batches:
                state, batch_loss, batch_words = self.step(x, y, w, state)
                loss_sum += float(batch_loss)
                words += float(batch_words)
                meter.update(words)
        return loss_sum, words

    def perplexity_over_ranks(self, split, max_batches=0):
        """(perplexity, words) of every rank's share of a split, sums reduced over ranks first.
        A rank whose share holds no sentence adds zeros; no word at all is an error."""
        sums = self.sums(split.sentences_once(allow_empty=True), max_batches)
        loss_sum, words = self.ranks.sum(tf.constant(sums, tf.float64)).numpy()
        if words <= 0:
            raise DataError(f"no sentences in {split.source}, on any rank")
        return perplexity(loss_sum, words), int(words)


def summary_writer(path):
    """A TensorBoard writer of event files in `path`, or a one-line error naming it when the
    folder cannot be made there (the log directory read-only, full, or a file in the way)."""
    try:
        return tf.summary.create_file_writer(path)
    except tf.errors.OpError as err:
        raise console.UserError(f"{path}: cannot create the TensorBoard event file "
                                f"({first_line(err)})") from None


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
