"""One training step with the original multi-tower semantics, the optimizer and the EMA.

Per rank (one "tower" of the original): loss = sum of weighted token losses
/ batch_size (the original's per-token mean times num_steps); embedding
gradients x batch_size; LSTM gradients clipped to max_grad_norm by global
norm. Across ranks: dense gradients averaged, sparse ones summed
(distributed.combine_gradients). Duplicate rows of a sparse gradient are
summed before Adagrad sees them, since Adagrad squares what it is given.
"""
import contextlib
import dataclasses

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


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step reports, each summed over ranks."""
    loss_sum: float  # weighted token losses
    words: float  # sum of the weights: real predictions
    lstm_norm: float  # LSTM gradient global norm before clipping (sum of the ranks' norms)
    signal_votes: float  # ranks that received SIGUSR1/SIGTERM
    time_votes: float  # ranks past --max_time
    exchange_bytes: float  # bytes of gradients handed to Horovod


STAT_FIELDS = [field.name for field in dataclasses.fields(StepStats)]


def payload_bytes(gradients):
    """Bytes of a list of gradients as handed to Horovod: dense tensors whole, IndexedSlices as
    their values and indices."""
    total = tf.constant(0.0)
    for g in gradients:
        parts = [g.values, g.indices] if isinstance(g, tf.IndexedSlices) else [g]
        for part in parts:
            total += tf.cast(tf.size(part), tf.float32) * part.dtype.size
    return total


class Trainer:
    """The model, its Adagrad optimizer and EMA, and the compiled training step.

    `exchange=False` skips the gradient exchange (each rank applies its own gradients): the
    bench's baseline for what the exchange costs, never a way to train."""

    def __init__(self, model, exchange=True):
        hps = model.hps
        self.model = model
        self.exchange = exchange
        self.optimizer = tf.keras.optimizers.Adagrad(
            learning_rate=hps.learning_rate, initial_accumulator_value=1.0)
        self.optimizer.build(model.all_variables)
        self.ema = ExponentialMovingAverage(model.lstm_variables, hps.ema_decay)
        self._compiled_step = tf.function(self._step)

    @property
    def global_step(self):
        return self.optimizer.iterations

    def state_variables(self):
        """What rank 0 broadcasts: weights, optimizer slots and step, EMA shadows (not row states)."""
        return self.model.all_variables + list(self.optimizer.variables) + self.ema.shadows

    def step(self, x, y, w, state, stop_votes):
        """One training step; returns the new row state and the StepStats (host numbers)."""
        state, stats = self._compiled_step(x, y, w, state, stop_votes)
        return state, StepStats(*(float(v) for v in stats.numpy()))

    def _step(self, x, y, w, state, stop_votes):
        model, hps = self.model, self.model.hps
        with tf.GradientTape() as tape:
            outputs, new_state = model.forward(x, state, training=True)
            token_losses = model.training_losses(outputs, y) * w
            loss = tf.reduce_sum(token_losses) / hps.batch_size
        variables = model.all_variables
        n_emb, n_lstm = len(model.embedding), len(model.lstm_variables)
        if hps.grad_combine == "tape":
            # Horovod's usual way: every gradient averaged over ranks, then clipped.
            if self.exchange:
                tape = distributed.gradient_tape(tape, hps)
            gradients = [sum_duplicates(g) for g in tape.gradient(loss, variables)]
            exchanged = payload_bytes(gradients)
            lstm, lstm_norm = tf.clip_by_global_norm(gradients[n_emb:n_emb + n_lstm], hps.max_grad_norm)
            gradients = gradients[:n_emb] + lstm + gradients[n_emb + n_lstm:]
        else:
            # The original's: LSTM gradients clipped per rank; duplicate rows summed before they
            # are sent (Horovod gathers what it is given) and again after (ranks share rows).
            gradients = [sum_duplicates(g) for g in tape.gradient(loss, variables)]
            lstm, lstm_norm = tf.clip_by_global_norm(gradients[n_emb:n_emb + n_lstm], hps.max_grad_norm)
            gradients = gradients[:n_emb] + lstm + gradients[n_emb + n_lstm:]
            exchanged = payload_bytes(gradients)
            if self.exchange and distributed.size() > 1:
                gradients = [sum_duplicates(g) for g in distributed.combine_gradients(gradients, hps)]
        embedding = [scale(g, float(hps.batch_size)) for g in gradients[:n_emb]]
        self.optimizer.apply_gradients(zip(embedding + gradients[n_emb:], variables))
        self.ema.update()
        if not self.exchange or distributed.size() == 1:
            exchanged = tf.constant(0.0)
        stats = tf.concat([tf.stack([tf.reduce_sum(token_losses), tf.reduce_sum(w), lstm_norm]), stop_votes,
                           [exchanged]], 0)
        return new_state, distributed.sum_over_ranks(stats)
