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
import math

import tensorflow as tf

from lm1b_hvd import distributed, tables
from lm1b_hvd.model import batch_major


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
    """Shadow copies of some variables, moved towards them after each step (constant decay).

    `vocab_tables`: vocabulary tables averaged too (average_tables). Their shadows are tables
    of the same rows (`table_shadows`, checkpointed as logical matrices like the tables): a
    second copy of each table and a pass over it every step, which is why the original
    averages the LSTM only."""

    def __init__(self, variables, decay, vocab_tables=()):
        self.decay = decay
        self.shadows = [tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "_ema") for v in variables]
        self.table_shadows = [tables.copy(table, f"{table.name}_ema") for table in vocab_tables]
        self._pairs = list(zip(self.shadows, variables)) + list(zip(
            tables.variables_of(self.table_shadows), tables.variables_of(vocab_tables)))

    def update(self):
        for shadow, target in self._pairs:
            shadow.assign_sub((1.0 - self.decay) * (shadow - target))

    def copy_averages_to_targets(self):
        """The targets take the averages' values: for good, where nothing trains afterwards
        (inference), or inside swapped_in."""
        for shadow, target in self._pairs:
            target.assign(shadow)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the targets hold the averages; afterwards their own values again."""
        saved = [tf.identity(target) for _, target in self._pairs]
        self.copy_averages_to_targets()
        try:
            yield
        finally:
            for value, (_, target) in zip(saved, self._pairs):
                target.assign(value)


def model_average(model):
    """The EMA a run of `model` keeps: of the LSTM, and of the vocabulary's tables with
    average_tables when evaluation reads the averages (average_params)."""
    hps = model.hps
    averaged_tables = model.tables if hps.average_tables and hps.average_params else ()
    return ExponentialMovingAverage(model.lstm_variables, hps.ema_decay, vocab_tables=averaged_tables)


def evaluation_weights(ema, hps):
    """The weights evaluation runs with, for the block: the EMA's averages when the run keeps
    them (average_params, the original's eval_test_ave), else the trained weights."""
    return ema.swapped_in() if hps.average_params else contextlib.nullcontext()


class FusedAdagrad(tf.keras.optimizers.Adagrad):
    """Keras's Adagrad updating each variable with TensorFlow's fused Adagrad kernels: one pass
    over a variable and its accumulator where Keras's update makes five.

    The original's tf.train.AdagradOptimizer: accumulators start at 1.0, no epsilon. Sparse
    gradients must have unique rows (training.sum_duplicates), as the kernel applies each row
    in turn. Keras keeps the accumulators of the variables it is built on (the LSTM's); the
    vocabulary tables' accumulators are tables of their own (`table_accumulators`, checkpointed
    as logical matrices like the tables), which the same kernels update."""

    def __init__(self, learning_rate, table_accumulators=()):
        # No XLA: Keras would compile each update on a GPU, and the kernels are already fused.
        super().__init__(learning_rate=learning_rate, initial_accumulator_value=1.0, epsilon=0.0,
                         jit_compile=False)
        self._tables = _TableSlots({variable.ref(): accumulator for table, accumulators in table_accumulators
                                    for variable, accumulator in zip(table.variables, accumulators.variables)})

    def _update_step(self, gradient, variable):
        accumulator = self._tables.accumulator_of(variable)
        if accumulator is None:
            return super()._update_step(gradient, variable)
        return self._fused_update(gradient, variable, accumulator)

    def lstm_accumulators(self):
        """Keras's accumulators, in the order of the variables it was built on (the LSTM's)."""
        return list(self._accumulators)

    def update_step(self, gradient, variable):
        self._fused_update(gradient, variable, self._accumulators[self._index_dict[self._var_key(variable)]])

    def _fused_update(self, gradient, variable, accumulator):
        lr = tf.cast(self.learning_rate, variable.dtype)
        epsilon = tf.cast(self.epsilon, variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            tf.raw_ops.ResourceSparseApplyAdagradV2(var=variable.handle, accum=accumulator.handle, lr=lr,
                                                    epsilon=epsilon, grad=gradient.values, indices=gradient.indices)
        else:
            tf.raw_ops.ResourceApplyAdagradV2(var=variable.handle, accum=accumulator.handle, lr=lr,
                                              epsilon=epsilon, grad=gradient)


class _TableSlots:
    """Which accumulator belongs to which table variable: a plain object, so that the Keras
    optimizer holding it does not track (and checkpoint) the tables' accumulators."""

    def __init__(self, by_variable):
        self._by_variable = by_variable

    def accumulator_of(self, variable):
        return self._by_variable.get(variable.ref())


class PlateauDecay:
    """The learning rate times `decay` whenever `patience` heldout evaluations in a row bring no
    new best perplexity (ReduceLROnPlateau's rule, for the corpora where a model overfits before
    the run ends). Every rank sees the same perplexities, so every rank decays at the same step.
    The rate is the optimizer's variable, checkpointed with it; the best and the count are the
    run position's (RunCheckpoints), so a resumed run decays where the unbroken one would."""

    def __init__(self, optimizer, decay, patience):
        self.optimizer, self.decay, self.patience = optimizer, decay, patience
        self.best = math.inf
        self.evaluations_without_best = 0

    @property
    def learning_rate(self):
        return float(self.optimizer.learning_rate.numpy())

    def after_evaluation(self, perplexity):
        """Counts the evaluation; when the rate decays, the line that says so, else None."""
        if perplexity < self.best:
            self.best, self.evaluations_without_best = perplexity, 0
            return None
        self.evaluations_without_best += 1
        if self.decay >= 1.0 or self.evaluations_without_best < self.patience:
            return None
        before = self.learning_rate
        self.optimizer.learning_rate.assign(before * self.decay)
        self.evaluations_without_best = 0
        return (f"learning rate {before:.4g} -> {self.learning_rate:.4g} (lr_decay): no better heldout perplexity "
                f"than {self.best:.2f} in {self.patience} evaluation(s)")

    def state(self):
        return {"best": None if math.isinf(self.best) else self.best,
                "evaluations_without_best": self.evaluations_without_best}

    def load(self, state):
        """What state() gave, or None (a checkpoint from before the schedule: nothing counted)."""
        state = state or {}
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.evaluations_without_best = int(state.get("evaluations_without_best", 0))


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
    allreduce_sent: float  # distributed.Traffic: bytes of the gradient exchange, per kind of op
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
    """The model, its Adagrad optimizer and EMA, and the compiled training step.

    `exchange=False` skips the gradient exchange (each rank applies its own gradients): the
    bench's baseline for what the exchange costs, never a way to train."""

    def __init__(self, model, exchange=True):
        hps = model.hps
        self.model = model
        self.exchange = exchange
        # Adagrad's accumulators of the vocabulary tables, from 1.0 as the original's.
        self.table_accumulators = [tables.like(table, f"{table.name}_accumulator", 1.0) for table in model.tables]
        self.optimizer = FusedAdagrad(hps.learning_rate, zip(model.tables, self.table_accumulators))
        self.optimizer.build(model.lstm_variables)
        # fp16 needs dynamic loss scaling; its state is not checkpointed (it re-adapts in steps).
        # Keras starts at 2^15, where this model's first steps overflow and are skipped.
        self.loss_scaler = (tf.keras.mixed_precision.LossScaleOptimizer(self.optimizer, initial_scale=2 ** 10)
                            if hps.precision == "fp16" else None)
        self.ema = model_average(model)
        self.lr_schedule = PlateauDecay(self.optimizer, hps.lr_decay, hps.lr_patience)
        # XLA compiles the dense middle of the step: LSTM layers and softmax math, forward and
        # backward. Gathers from the shards, candidate sampling and the exchange stay outside.
        self._token_losses_fn = (tf.function(self._token_losses, jit_compile=True) if hps.xla
                                 else self._token_losses)
        self.retrace()

    def retrace(self):
        """A fresh compiled step: the old one baked in this process's rank and the rank count."""
        self._compiled_step = tf.function(self._step)
        self._traced_steps = {}

    @property
    def global_step(self):
        return self.optimizer.iterations

    def state_variables(self):
        """What rank 0 broadcasts: weights, optimizer slots and step, EMA shadows (not row states;
        vocabulary-parallel, not the tables either: each rank holds rows of its own)."""
        if self.model.vocab_parallel:
            return self.model.lstm_variables + list(self.optimizer.variables) + self.ema.shadows
        return (self.model.all_variables + list(self.optimizer.variables) + tables.variables_of(self.table_accumulators)
                + self.ema.shadows + tables.variables_of(self.ema.table_shadows))

    def step(self, x, y, w, state, votes=Votes()):
        """One training step; returns the new row state and the StepStats (host numbers)."""
        args = (tf.convert_to_tensor(x), tf.convert_to_tensor(y), tf.convert_to_tensor(w), state, votes.as_tensor())
        state, stats = self._traced_step(args)(*args)
        return state, StepStats.from_vector(stats.numpy())

    def _traced_step(self, args):
        """The step traced for these argument shapes. Called directly it skips the argument
        matching a tf.function does on every call, a noticeable part of a small model's step."""
        key = tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(args))
        if key not in self._traced_steps:
            self._traced_steps[key] = self._compiled_step.get_concrete_function(*args)
        return self._traced_steps[key]

    def step_seed(self):
        """The stateless seed of this rank's next step: (seed, rank) and the step number, so the
        candidates and dropout masks of a step are the same in a resumed run as in an unbroken one."""
        base = self.model.hps.seed * 1_000_003 + distributed.rank()
        return tf.stack([tf.constant(base, tf.int64), tf.cast(self.global_step, tf.int64)])

    def _token_losses(self, embedded, state, softmax_rows, y, w, seed):
        """Weighted per-token training losses [batch, steps] and the new row state."""
        model = self.model
        output_chunks, new_state = model.run_layers(embedded, state, training=True, seed=seed)
        if softmax_rows is None:
            losses = model.full_softmax_losses(batch_major(output_chunks), y)
        else:
            losses = model.sampled_losses(output_chunks, softmax_rows)
        return losses * w, new_state

    def _gradients(self, x, y, w, state, traffic):
        """(token losses, new state, gradients of every variable, unscaled), under one tape; with
        grad_combine=tape the tape is Horovod's, the gradients come back averaged and what it
        moved is counted into `traffic`."""
        model, hps = self.model, self.model.hps
        seed = self.step_seed()
        with tf.GradientTape() as tape:
            softmax_rows = model.softmax_rows(y, seed, traffic) if model.uses_sampled_softmax() else None
            embedded = model.embed(x, traffic, seed)
            token_losses, new_state = self._token_losses_fn(embedded, state, softmax_rows, y, w, seed)
            loss = tf.reduce_sum(token_losses) / hps.batch_size
            if self.loss_scaler:
                loss = self.loss_scaler.get_scaled_loss(loss)
        if hps.grad_combine == "tape" and self.exchange:
            # Vocabulary-parallel, the tables' gradients are already with their owners.
            local = tables.variables_of(model.tables) if model.vocab_parallel else []
            tape = distributed.gradient_tape(tape, hps, traffic, local_sources=local)
        gradients = tape.gradient(loss, model.all_variables)
        if self.loss_scaler:
            gradients = self.loss_scaler.get_unscaled_gradients(gradients)
        return token_losses, new_state, gradients

    def _step(self, x, y, w, state, votes):
        model, hps = self.model, self.model.hps
        traffic = distributed.Traffic()
        token_losses, new_state, raw = self._gradients(x, y, w, state, traffic)
        gradients = [sum_duplicates(g) for g in raw]
        n_emb, n_lstm = len(model.embedding), len(model.lstm_variables)
        exchange = self.exchange and distributed.size() > 1
        # rank_clip (the original): LSTM gradients clipped per rank, then exchanged; duplicate
        # rows are summed before sending (Horovod gathers what it is given) and again after
        # (ranks share rows). tape: Horovod already averaged everything; clip after.
        duplicates = tf.constant(0.0)
        if exchange and hps.grad_combine == "rank_clip" and not model.vocab_parallel:
            duplicates = sum(distributed.tensor_bytes(g) for g in raw) - sum(distributed.tensor_bytes(g)
                                                                                for g in gradients)
        lstm, lstm_norm = tf.clip_by_global_norm(gradients[n_emb:n_emb + n_lstm], hps.max_grad_norm)
        gradients = gradients[:n_emb] + lstm + gradients[n_emb + n_lstm:]
        if exchange and hps.grad_combine == "rank_clip":
            gradients = [sum_duplicates(g) for g in distributed.combine_gradients(
                gradients, hps, traffic, exchange_sparse=not model.vocab_parallel)]
        # Tied, the table's whole gradient (its rows as inputs and as the softmax's) takes the x batch_size.
        embedding = [scale(g, float(hps.batch_size)) for g in gradients[:n_emb]]
        (self.loss_scaler or self.optimizer).apply_gradients(zip(embedding + gradients[n_emb:], model.all_variables))
        self.ema.update()
        stats = dict(loss_sum=tf.reduce_sum(token_losses), words=tf.reduce_sum(w), lstm_norm=lstm_norm,
                     duplicate_bytes=duplicates, **traffic.bytes, **dict(zip(_names(Votes), tf.unstack(votes))))
        return new_state, distributed.sum_over_ranks(stack_stats(stats))
