"""The original's optimizer, Adagrad, and the learning rate's schedule.

tf.train.AdagradOptimizer of the original: accumulators start at 1.0, no epsilon. Adagrad
squares what it is given, so a sparse gradient's duplicate rows are summed before it sees them
(update.step.sum_duplicates).
"""
import math

import tensorflow as tf

from lm1b_hvd import pinned_stack


class FusedAdagrad(pinned_stack.KerasAdagrad):
    """Keras's Adagrad updating each variable with TensorFlow's fused Adagrad kernels: one pass
    over a variable and its accumulator where Keras's update makes five.

    Sparse gradients must have unique rows, as the kernel applies each row in turn. Keras keeps
    the accumulators of the variables it is built on (the LSTM's); the vocabulary tables'
    accumulators are tables of their own (`table_accumulators`, checkpointed as logical
    matrices like the tables), which the same kernels update."""

    def __init__(self, learning_rate, table_accumulators=()):
        # No XLA: Keras would compile each update on a GPU, and the kernels are already fused.
        super().__init__(learning_rate=learning_rate, initial_accumulator_value=1.0, epsilon=0.0,
                         jit_compile=False)
        self._tables = _TableSlots({variable.ref(): accumulator for table, accumulators in table_accumulators
                                    for variable, accumulator in zip(table.variables, accumulators.variables)})

    def slot_of(self, variable):
        """The accumulator of any variable it updates: a table's block or an LSTM variable."""
        accumulator = self._tables.accumulator_of(variable)
        return self.accumulator_of(variable) if accumulator is None else accumulator

    def update_variable(self, gradient, variable):
        accumulator = self.slot_of(variable)
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
    The rate is the optimizer's variable, checkpointed with it; the best and the count ride in
    the run position (run.state), so a resumed run decays where the unbroken one would."""

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
