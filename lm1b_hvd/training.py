"""One training step with the original multi-tower semantics, the optimizer and the EMA.

Per rank (one "tower" of the original): loss = sum of weighted token losses
/ batch_size (the original's per-token mean times num_steps); embedding
gradients x batch_size; LSTM gradients clipped to max_grad_norm by global
norm. Across ranks: dense gradients averaged, sparse ones summed
(distributed.combine_gradients). Duplicate rows of a sparse gradient are
summed before Adagrad sees them, since Adagrad squares what it is given.
"""
import contextlib

import tensorflow as tf

from lm1b_hvd import distributed


def sum_duplicates(gradient):
    """An IndexedSlices with unique indices (rows of equal index added); dense passes through."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    unique, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, gradient.dense_shape)


def scale(gradient, factor):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values * factor, gradient.indices, gradient.dense_shape)
    return gradient * factor


class ExponentialMovingAverage:
    """Shadow copies of some variables, moved towards them after each step (constant decay)."""

    def __init__(self, variables, decay):
        self.targets = list(variables)
        self.decay = decay
        self.shadows = [tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "_ema")
                        for v in self.targets]

    def update(self):
        for shadow, target in zip(self.shadows, self.targets):
            shadow.assign_sub((1.0 - self.decay) * (shadow - target))

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the targets hold the averages; afterwards their own values again."""
        saved = [tf.identity(v) for v in self.targets]
        for shadow, target in zip(self.shadows, self.targets):
            target.assign(shadow)
        try:
            yield
        finally:
            for value, target in zip(saved, self.targets):
                target.assign(value)


class Trainer:
    """The model, its Adagrad optimizer and EMA, and the compiled training step."""

    def __init__(self, model):
        hps = model.hps
        self.model = model
        self.optimizer = tf.keras.optimizers.Adagrad(
            learning_rate=hps.learning_rate, initial_accumulator_value=1.0)
        self.optimizer.build(model.all_variables)
        self.ema = ExponentialMovingAverage(model.lstm_variables, hps.ema_decay)
        self.step = tf.function(self._step)

    @property
    def global_step(self):
        return self.optimizer.iterations

    def state_variables(self):
        """What rank 0 broadcasts: weights, optimizer slots and step, EMA shadows (not row states)."""
        return self.model.all_variables + list(self.optimizer.variables) + self.ema.shadows

    def _step(self, x, y, w, state, stop_votes):
        """Returns the new row state and, summed over ranks:
        [loss sum, words, LSTM grad norm, signal stop votes, time-limit stop votes]."""
        model, hps = self.model, self.model.hps
        with tf.GradientTape() as tape:
            outputs, new_state = model.forward(x, state, training=True)
            token_losses = model.training_losses(outputs, y) * w
            loss = tf.reduce_sum(token_losses) / hps.batch_size
        variables = model.all_variables
        gradients = tape.gradient(loss, variables)
        n_emb, n_lstm = len(model.embedding), len(model.lstm_variables)
        embedding = [scale(g, float(hps.batch_size)) for g in gradients[:n_emb]]
        lstm, lstm_norm = tf.clip_by_global_norm(gradients[n_emb:n_emb + n_lstm], hps.max_grad_norm)
        combined = distributed.combine_gradients(embedding + lstm + gradients[n_emb + n_lstm:])
        self.optimizer.apply_gradients(zip([sum_duplicates(g) for g in combined], variables))
        self.ema.update()
        stats = tf.concat([tf.stack([tf.reduce_sum(token_losses), tf.reduce_sum(w), lstm_norm]), stop_votes], 0)
        return new_state, distributed.sum_over_ranks(stats)
