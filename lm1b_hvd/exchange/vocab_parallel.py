"""The vocabulary sharded over the ranks (hparam vocab_parallel): what moves between them.

Rank r holds the contiguous rows model.tables.owned_rows(vocab, r, ranks) of the embedding and
of the softmax's weights and biases, with their Adagrad slots. A step fetches the rows it needs
(each unique) from their owners with Horovod's alltoall; the alltoall's gradient is an alltoall
back, so the rows' gradients reach their owners, who sum what every rank sent. The full softmax
of an evaluation is taken over the ranks' shares: each rank computes its rows' logits for every
rank's outputs, and the log-sum-exps are combined.
"""
import tensorflow as tf

from lm1b_hvd import console
from lm1b_hvd.exchange import collectives
from lm1b_hvd.model import tables


class VocabularyTooSmall(console.UserError):
    pass


def vocab_exchange(hps, vocab_size, ranks):
    """The VocabExchange of a vocabulary-parallel run (hparam vocab_parallel), else None."""
    if not hps.vocab_parallel:
        return None
    if vocab_size < ranks.size:
        raise VocabularyTooSmall(f"vocab_parallel=true needs at least one vocabulary row per rank: {vocab_size} "
                                 f"row(s) for {ranks.size} ranks")
    return VocabExchange(vocab_size, ranks)


class VocabExchange:
    """The rows this rank owns, and the collectives that bring a step the rows it needs."""

    def __init__(self, vocab_size, ranks):
        self.vocab_size, self.ranks = vocab_size, ranks
        self.rank, self.size = ranks.rank, ranks.size
        self.rows = tables.owned_rows(vocab_size, self.rank, self.size)

    def fetch(self, matrices, ids, traffic=None):
        """Rows `ids` (unique, int64 [n]) of the vocabulary-wide matrices whose shares here are
        `matrices` ([rows held, width] or [rows held]), side by side: [n, sum of widths]."""
        owner = tables.owners(ids, self.vocab_size, self.size)
        order = tf.argsort(owner, stable=True)  # alltoall sends rank by rank
        splits = tf.math.bincount(owner, minlength=self.size, maxlength=self.size, dtype=tf.int32)
        requested, requested_splits = collectives.alltoall(tf.gather(ids, order), splits, self.ranks)
        local = requested - self.rows.first
        gathered = [tf.gather(matrix, local) for matrix in matrices]
        sent = tf.concat([rows if rows.shape.rank == 2 else rows[:, None] for rows in gathered], axis=1)
        rows, _ = collectives.alltoall(sent, requested_splits, self.ranks)
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
        every_output = collectives.allgather(outputs, self.ranks)
        every_target = tf.cast(collectives.allgather(targets, self.ranks), tf.int64)
        logits = tf.matmul(every_output, weights, transpose_b=True) + biases
        shares = tf.reshape(collectives.allgather(tf.reduce_logsumexp(logits, axis=1), self.ranks), [self.size, -1])
        log_sum_exp = tf.reduce_logsumexp(shares, axis=0)
        local = every_target - self.rows.first
        held = (local >= 0) & (local < self.rows.count)
        target_logits = tf.where(held, tf.gather(logits, tf.clip_by_value(local, 0, self.rows.count - 1),
                                                 batch_dims=1), 0.0)
        losses = log_sum_exp - self.ranks.sum(target_logits)
        batch = tf.shape(outputs)[0]
        return losses[self.rank * batch:(self.rank + 1) * batch]
