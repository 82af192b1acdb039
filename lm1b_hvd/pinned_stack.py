"""The private parts of the pinned stack this package relies on, and nothing else.

TensorFlow 2.15 (with Keras 2.15) and Horovod 0.28.1 are pinned together (requirements.txt):
Horovod's last release does not build against a newer TensorFlow. Each name below is an
attribute, a key, a text or a signature that those versions do not promise to keep; moving to
another version means checking each one here, and only here (tests/test_layout.py greps the rest
of the package for them). Every entry says what it relies on and where that is defined in the
pinned version. Horovod itself is imported by exchange.collectives alone, which hands the
Horovod modules to the functions here that need them.
"""
import re

import tensorflow as tf

# The names and texts this module touches, for the test that nothing else does.
PRIVATE_NAMES = ("_update_step", "_accumulators", "_index_dict", "_var_key", "_allreduce_grads", "_write",
                 "optimizer/_variables", "optimizer/_iterations", "run_fn", ".ATTRIBUTES/VARIABLE_VALUE",
                 "{{node Horovod")


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
    return checkpoint_value_key(f"{root}/_variables/{index}")


def keras_optimizer_iterations_key(root="optimizer"):
    """The checkpoint key of a Keras 2.15 optimizer's step count (its attribute `_iterations`)."""
    return checkpoint_value_key(f"{root}/_iterations")


def checkpoint_value_key(path):
    """The key under which TensorFlow's object checkpoint holds the value of the variable at
    `path` (its attributes from the root object, joined by '/': 'model/embedding/0').

    Relies on (TensorFlow 2.15, tensorflow/python/checkpoint/, trackable's
    `VARIABLE_VALUE_KEY` and the object graph's `.ATTRIBUTES` naming): a variable's value is
    saved as `PATH/.ATTRIBUTES/VARIABLE_VALUE`, the key tf.train.list_variables lists and
    TensorBoard's projector names a tensor by."""
    return f"{path}/.ATTRIBUTES/VARIABLE_VALUE"


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


# Horovod 0.28.1's elastic mode and its failures, for exchange.collectives (which imports Horovod
# and hands its modules here).

def horovod_elastic_state(elastic, broadcast_object, rank):
    """A base class for an elastic state of the project's own, which defines save(), restore()
    and sync() and calls `super().__init__()`.

    Relies on (Horovod 0.28.1, horovod/common/elastic.py, given as `elastic`): `State`, whose
    constructor takes `bcast_object` (Horovod's broadcast of a picklable object) and `get_rank`,
    and whose commit(), check_host_updates() and the retry loop call save(), restore() and sync()."""
    class HorovodState(elastic.State):
        def __init__(self):
            super().__init__(bcast_object=broadcast_object, get_rank=rank)

    return HorovodState


def elastic_retry_loop(elastic, train, restart):
    """Horovod's elastic retry loop around `train(state)`, restarting Horovod with `restart()`
    after a lost rank.

    Relies on (Horovod 0.28.1, horovod/common/elastic.py, given as `elastic`): `run_fn(func,
    reset)`, the loop that hvd.elastic.run wraps (horovod/tensorflow/elastic.py, with a reset of
    shutdown() and init()); it syncs the state, calls func(state), and on HorovodInternalError
    restores the state's last commit, calls reset and the state's reset callbacks and calls
    func again. hvd.elastic.run itself turns only allreduce, allgather and broadcast failures
    into that error (and swallows any other UnknownError), so the caller wraps `train` itself."""
    return elastic.run_fn(train, restart)


def is_horovod_failure(err):
    """Whether TensorFlow's error `err` is a failed Horovod collective.

    Relies on (TensorFlow 2.15 with Horovod 0.28.1): a Horovod op that fails inside a traced
    function raises tf.errors.UnknownError whose message names Horovod (its op, 'HorovodAllreduce_...',
    or its status text, 'Horovod has been shut down')."""
    return isinstance(err, tf.errors.UnknownError) and "Horovod" in err.message


def horovod_failure_cause(message):
    """The op kind and the cause in a failed Horovod op's message ('HorovodAllgather: Timed out
    waiting 30000ms for recv operation to complete'), else its first line.

    Relies on (TensorFlow 2.15 with Horovod 0.28.1): TensorFlow puts the op's error text on the
    line before its node, '[[{{node HorovodAllgather_...}}]]', and Horovod's text starts with its
    source location in brackets ('[horovod/common/...:123] ') and ends with sentences of advice."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    at = next((index for index, line in enumerate(lines) if "{{node Horovod" in line), None)
    if at is None:
        return lines[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[at - 1] if at > 0 else "").split(". ")[0]
    kind = re.search(r"\{\{node (Horovod[A-Za-z]+)", lines[at]).group(1)
    return f"{kind}: {cause}" if cause else kind
