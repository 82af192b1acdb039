"""Heldout evaluation with the full softmax: loss sums and word counts, reduced once.

Perplexity is exp(sum of token losses / sum of weights) with both sums taken
over every rank before dividing, so N ranks report the number one process would.
"""
import contextlib
import math

import tensorflow as tf

from lm1b_hvd import checkpoints, console, data, distributed


class Evaluator:
    """Full-softmax loss sums of a model, with the EMA weights (`ema`) when the run averages them."""

    def __init__(self, model, ema, report=None):
        self.model = model
        self.ema = ema if model.hps.average_params else None
        self.report = report  # where progress lines of a long evaluation go (None: nowhere)
        self.step = tf.function(self._step)

    def _step(self, x, y, w, state):
        outputs, new_state = self.model.forward(x, state, training=False)
        losses = self.model.full_softmax_losses(outputs, y) * w
        return new_state, tf.reduce_sum(losses), tf.reduce_sum(w)

    def sums(self, dataset, max_batches=0, allow_empty=False):
        """(loss sum, word count) over every sentence of `dataset` once (at most `max_batches`
        batches when > 0), row state carried; `allow_empty` as in ShardedDataset.sentences_once."""
        hps = self.model.hps
        sentences, total = self._sentences_and_total(dataset, max_batches, allow_empty)
        meter = console.Meter("evaluation (full softmax)", total, "words", report=self.report or (lambda _: None))
        state = self.model.zero_state(hps.batch_size)
        loss_sum, words = 0.0, 0.0
        with self.ema.swapped_in() if self.ema else contextlib.nullcontext():
            for index, (x, y, w) in enumerate(data.pack_batches(sentences, hps.batch_size, hps.num_steps)):
                if max_batches and index >= max_batches:
                    break
                state, batch_loss, batch_words = self.step(x, y, w, state)
                loss_sum += float(batch_loss)
                words += float(batch_words)
                meter.update(words)
        return loss_sum, words

    def _sentences_and_total(self, dataset, max_batches, allow_empty):
        """This rank's sentences and the words to evaluate in them (the progress lines' total).
        A whole split is read once into memory and counted there (a heldout split is small);
        a capped one is streamed, its total the cap."""
        sentences = dataset.sentences_once(allow_empty)
        if max_batches:
            return sentences, max_batches * self.model.hps.batch_size * self.model.hps.num_steps
        sentences = list(sentences)
        return sentences, sum(len(sentence) - 1 for sentence in sentences)

    def perplexity_over_ranks(self, dataset, max_batches=0):
        """(perplexity, words) of every rank's share of a split, sums reduced over ranks first.
        A rank whose share holds no sentence adds zeros; no word at all is an error."""
        sums = self.sums(dataset, max_batches, allow_empty=True)
        loss_sum, words = distributed.sum_over_ranks(tf.constant(sums, tf.float64)).numpy()
        if words <= 0:
            raise data.DataError(f"no sentences in {dataset.source}, on any rank")
        return perplexity(loss_sum, words), int(words)


def summary_writer(path):
    """A TensorBoard writer of event files in `path`, or a one-line error naming it when the
    folder cannot be made there (the log directory read-only, full, or a file in the way)."""
    try:
        return tf.summary.create_file_writer(path)
    except tf.errors.OpError as err:
        raise console.UserError(f"{path}: cannot create the TensorBoard event file "
                                f"({checkpoints.first_line(err)})") from None


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
