"""One training step with the original multi-tower semantics: what N ranks apply.

Per rank (one "tower" of the original): loss = sum of weighted token losses / batch_size (the
original's per-token mean times num_steps); embedding gradients x batch_size; LSTM gradients
clipped to max_grad_norm by global norm. Across ranks: dense gradients averaged, sparse ones
summed (exchange.gradients). Duplicate rows of a sparse gradient are summed before Adagrad sees
them, since Adagrad squares what it is given. Then Adagrad and the EMA update the run's state
(run.state.TrainingState), which this module only reads and updates.
"""
import dataclasses

import tensorflow as tf

from lm1b_hvd.exchange.gradients import GradientExchange, Traffic, tensor_bytes
from lm1b_hvd.ranks import ONE_PROCESS
from lm1b_hvd.model import tables
from lm1b_hvd.model.language_model import batch_major
from lm1b_hvd.model.step_seeds import step_seed


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


@dataclasses.dataclass(frozen=True)
class Votes:
    """What a rank asks of this step. Summed over ranks with the step's statistics (StepStats
    fields of the same names), so that every rank acts on a request at the same step."""
    stop_signal: bool = False  # SIGUSR1/SIGTERM received
    out_of_time: bool = False  # past --max_time
    checkpoint: bool = False  # a checkpoint is due by the clock (rank 0's clock decides)

    def as_tensor(self):
        return tf.constant([float(getattr(self, name)) for name in _names(Votes)])


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step reports, each summed over ranks."""
    loss_sum: float  # weighted token losses
    words: float  # sum of the weights: real predictions
    lstm_norm: float  # LSTM gradient global norm before clipping (sum of the ranks' norms)
    allreduce_sent: float  # exchange.gradients.Traffic: bytes of the gradient exchange, per kind of op
    allreduce_received: float
    allgather_sent: float
    allgather_received: float
    alltoall_sent: float
    alltoall_received: float
    duplicate_bytes: float  # bytes more it would have sent without summing duplicate rows first
    stop_signal: float  # Votes: ranks that received SIGUSR1/SIGTERM
    out_of_time: float  # ranks past --max_time
    checkpoint: float  # ranks asking for a checkpoint now

    @classmethod
    def from_vector(cls, values):
        """From the summed vector that stack_stats made."""
        return cls(**{name: float(value) for name, value in zip(_names(cls), values)})


def stack_stats(named):
    """A {StepStats field: scalar tensor} dict as one vector, for one allreduce of them all."""
    return tf.stack([named[name] for name in _names(StepStats)])


def _names(record):
    return [field.name for field in dataclasses.fields(record)]


class Trainer:
    """The compiled training step of a run.state.TrainingState (its model, optimizer, EMA),
    whose gradients travel between `exchange_ranks` (default: `ranks`; in a two-level run the
    ranks of this rank's node, run.modes). The step's statistics and votes are summed over every
    rank of `ranks` either way. `averages_each_step=False`: the EMA is left to the sync mode
    (a two-level run moves it at outer steps, update.outer).

    `exchange=False` skips the gradient exchange (each rank applies its own gradients): the
    bench's baseline for what the exchange costs, never a way to train."""

    def __init__(self, state, ranks=ONE_PROCESS, exchange=True, exchange_ranks=None, averages_each_step=True):
        hps = state.model.hps
        self.state, self.model, self.ranks = state, state.model, ranks
        self.exchange_ranks = exchange_ranks or ranks
        self.average_each_step = averages_each_step
        self.exchange = GradientExchange(self.exchange_ranks, hps) if exchange else None
        # XLA compiles the dense middle of the step: LSTM layers and softmax math, forward and
        # backward. Gathers from the shards, candidate sampling and the exchange stay outside.
        self._token_losses_fn = (tf.function(self._token_losses, jit_compile=True) if hps.xla
                                 else self._token_losses)
        self.retrace()

    def retrace(self):
        """A fresh compiled step: the old one baked in this process's rank and the rank count."""
        self._compiled_step = tf.function(self._step)
        self._traced_steps = {}

    def step(self, x, y, w, row_state, votes=Votes()):
        """One training step; returns the new row state and the StepStats (host numbers)."""
        args = (tf.convert_to_tensor(x), tf.convert_to_tensor(y), tf.convert_to_tensor(w), row_state,
                votes.as_tensor())
        row_state, stats = self.traced_step(args)(*args)
        return row_state, StepStats.from_vector(stats.numpy())

    def traced_step(self, args):
        """The step traced for these argument shapes. Called directly it skips the argument
        matching a tf.function does on every call, a noticeable part of a small model's step."""
        key = tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(args))
        if key not in self._traced_steps:
            self.state.prepare_loss_scaling()  # not inside the trace: Keras must track what it makes
            self._traced_steps[key] = self._compiled_step.get_concrete_function(*args)
        return self._traced_steps[key]

    def _token_losses(self, embedded, row_state, softmax_rows, y, w, seed):
        """Weighted per-token training losses [batch, steps] and the new row state."""
        model = self.model
        output_chunks, new_state = model.run_layers(embedded, row_state, training=True, seed=seed)
        if softmax_rows is None:
            losses = model.full_softmax_losses(batch_major(output_chunks), y)
        else:
            losses = model.sampled_losses(output_chunks, softmax_rows)
        return losses * w, new_state

    def gradients(self, x, y, w, row_state, traffic):
        """(token losses, new row state, gradients of every variable, unscaled), under one tape;
        with grad_combine=tape the tape is Horovod's, the gradients come back averaged and what
        it moved is counted into `traffic`."""
        model, hps, loss_scaler = self.model, self.model.hps, self.state.loss_scaler
        seed = step_seed(hps.seed, self.ranks.rank, self.state.step)
        with tf.GradientTape() as tape:
            softmax_rows = model.softmax_rows(y, seed, traffic) if model.uses_sampled_softmax() else None
            embedded = model.embed(x, traffic, seed)
            token_losses, new_state = self._token_losses_fn(embedded, row_state, softmax_rows, y, w, seed)
            loss = tf.reduce_sum(token_losses) / hps.batch_size
            if loss_scaler:
                loss = loss_scaler.get_scaled_loss(loss)
        if hps.grad_combine == "tape" and self.exchange:
            # Vocabulary-parallel, the tables' gradients are already with their owners.
            local = tables.variables_of(model.tables) if model.vocab_parallel else []
            tape = self.exchange.tape(tape, traffic, local_sources=local)
        gradients = tape.gradient(loss, model.all_variables)
        if loss_scaler:
            gradients = loss_scaler.get_unscaled_gradients(gradients)
        return token_losses, new_state, gradients

    def _step(self, x, y, w, row_state, votes):
        model, hps, state = self.model, self.model.hps, self.state
        traffic = Traffic()
        token_losses, new_state, raw = self.gradients(x, y, w, row_state, traffic)
        gradients = [sum_duplicates(g) for g in raw]
        n_emb, n_lstm = len(model.embedding), len(model.lstm_variables)
        exchange = self.exchange and self.exchange_ranks.size > 1
        # rank_clip (the original): LSTM gradients clipped per rank, then exchanged; duplicate
        # rows are summed before sending (Horovod gathers what it is given) and again after
        # (ranks share rows). tape: Horovod already averaged everything; clip after.
        duplicates = tf.constant(0.0)
        if exchange and hps.grad_combine == "rank_clip" and not model.vocab_parallel:
            duplicates = sum(tensor_bytes(g) for g in raw) - sum(tensor_bytes(g) for g in gradients)
        lstm, lstm_norm = tf.clip_by_global_norm(gradients[n_emb:n_emb + n_lstm], hps.max_grad_norm)
        gradients = gradients[:n_emb] + lstm + gradients[n_emb + n_lstm:]
        if exchange and hps.grad_combine == "rank_clip":
            gradients = [sum_duplicates(g) for g in self.exchange.combine(gradients, traffic,
                                                                          exchange_sparse=not model.vocab_parallel)]
        # Tied, the table's whole gradient (its rows as inputs and as the softmax's) takes the x batch_size.
        embedding = [scale(g, float(hps.batch_size)) for g in gradients[:n_emb]]
        (state.loss_scaler or state.optimizer).apply_gradients(zip(embedding + gradients[n_emb:], model.all_variables))
        if self.average_each_step:
            state.ema.update()
        stats = dict(loss_sum=tf.reduce_sum(token_losses), words=tf.reduce_sum(w), lstm_norm=lstm_norm,
                     duplicate_bytes=duplicates, **traffic.bytes, **dict(zip(_names(Votes), tf.unstack(votes))))
        return new_state, self.ranks.sum(stack_stats(stats))
