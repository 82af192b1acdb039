"""The private parts of the pinned stack this package relies on, and nothing else.

TensorFlow 2.15 (with Keras 2.15) and Horovod 0.28.1 are pinned together (requirements.txt):
Horovod's last release does not build against a newer TensorFlow. Each name below is an
attribute or a key that those versions do not promise to keep; moving to another version means
checking each one here, and only here (tests/test_layout.py greps the rest of the package for
them). Every entry says what it relies on and where that is defined in the pinned version.
"""
import tensorflow as tf

# The names this module touches, for the test that nothing else does.
PRIVATE_NAMES = ("_update_step", "_accumulators", "_index_dict", "_var_key", "_allreduce_grads", "_write",
                 "optimizer/_variables", "optimizer/_iterations")


class KerasAdagrad(tf.keras.optimizers.Adagrad):
    """Keras's Adagrad whose update of each variable is the subclass's `update_variable`, for
    every variable apply_gradients is given, whether the optimizer was built on it or not.

    Relies on (Keras 2.15, keras/src/optimizers/optimizer.py): apply_gradients calls
    `_update_step(gradient, variable)` once per pair (with jit_compile=False), and skips, in the
    base class's version, the variables it was not built on; the accumulators of the variables
    it was built on are `_accumulators[_index_dict[_var_key(variable)]]`."""

    def _update_step(self, gradient, variable):
        return self.update_variable(gradient, variable)

    def update_variable(self, gradient, variable):
        raise NotImplementedError

    def accumulator_of(self, variable):
        """Keras's accumulator of a variable the optimizer was built on."""
        return self._accumulators[self._index_dict[self._var_key(variable)]]

    def accumulators(self):
        """Keras's accumulators, in the order of the variables it was built on."""
        return list(self._accumulators)


def keras_optimizer_slot_key(index, root="optimizer"):
    """The checkpoint key of a Keras 2.15 optimizer's variable number `index` (0: iterations, then
    one accumulator per variable it was built on), saved as the attribute `_variables` of the
    object `root`: what an earlier checkpoint format of this trainer holds its slots under."""
    return f"{root}/_variables/{index}/.ATTRIBUTES/VARIABLE_VALUE"


def keras_optimizer_iterations_key(root="optimizer"):
    """The checkpoint key of a Keras 2.15 optimizer's step count (its attribute `_iterations`)."""
    return f"{root}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


class ManagedWrite:
    """What tf.train.CheckpointManager saves through, for a checkpoint that is not a
    tf.train.Checkpoint: `write(file_prefix)` writes it whole.

    Relies on (TensorFlow 2.15, checkpoint_management.py, CheckpointManager.save): the manager
    increments `save_counter`, then calls `_write(prefix, options=...)` and expects the prefix
    back; its record of the latest checkpoints (the `checkpoint` file, the deletion of the oldest)
    is the callbacks in `options.experimental_write_callbacks`, called after the files exist."""

    def __init__(self, write, save_counter):
        self.write, self.save_counter = write, save_counter

    def _write(self, file_prefix, options=None):
        self.write(file_prefix)
        for callback in (options.experimental_write_callbacks or []) if options else []:
            callback(file_prefix)
        return file_prefix


def observe_tape_reduction(distributed_tape, observe):
    """Calls `observe(local gradient, reduced gradient)` for every gradient Horovod's
    DistributedGradientTape reduces (it keeps the local ones to itself otherwise).

    Relies on (Horovod 0.28.1, horovod/tensorflow/__init__.py): the tape reduces its gradients
    with its attribute `_allreduce_grads(gradients, sources, ...)`, which returns them in order."""
    reduce = distributed_tape._allreduce_grads

    def reduce_and_observe(gradients, sources, *args):
        reduced = reduce(gradients, sources, *args)
        for local, result in zip(gradients, reduced):
            if local is not None:
                observe(local, result)
        return reduced

    distributed_tape._allreduce_grads = reduce_and_observe
    return distributed_tape
