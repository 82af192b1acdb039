"""The private parts of the pinned stacks this package relies on, and nothing else.

Two stacks (stacks/, chosen by install.sh): 2.15 is TensorFlow 2.15.1 with Keras 2.15.0, 2.20 is
TensorFlow 2.20.0 with tf-keras 2.20.1 (Keras 2 for TensorFlow 2.16 and later, which
lm1b_hvd/__init__.py selects); both build Horovod 0.28.1 from its source, with the patches of
stacks/horovod-0.28.1/. Each name below is an attribute, a key, a text or a signature that those
versions do not promise to keep; moving to another version means checking each one here, and only
here (tests/test_layout.py greps the rest of the package for them). Where each stack has it:

    private part                     stack 2.15                          stack 2.20
    optimizer's _update_step,        keras 2.15.0,                       tf-keras 2.20.1,
      _accumulators, _index_dict,      keras/src/optimizers/               tf_keras/src/optimizers/
      _var_key                         optimizer.py, adagrad.py            optimizer.py, adagrad.py
    optimizer/_variables,            keras 2.15.0 (as above)             tf-keras 2.20.1 (as above)
      optimizer/_iterations keys
    _coalesced_children              (none: children listed afresh)      tf-keras 2.20.1, optimizer.py
    .ATTRIBUTES/VARIABLE_VALUE       tensorflow 2.15.1,                  tensorflow 2.20.0 (same files)
                                       python/trackable/constants.py
    CheckpointManager's _write and   tensorflow 2.15.1, python/          tensorflow 2.20.0 (same file)
      experimental_write_callbacks     checkpoint/checkpoint_management.py
    DistributedGradientTape's        horovod 0.28.1,                     horovod 0.28.1 (the same Python;
      _allreduce_grads                 horovod/tensorflow/__init__.py      the patches change no Python
    elastic State, run_fn            horovod 0.28.1,                       of these files)
                                       horovod/common/elastic.py
    a failed op's text,              tensorflow 2.15.1 + horovod 0.28.1  tensorflow 2.20.0 + horovod 0.28.1
      '{{node Horovod...}}'

tests/test_pinned_stack.py checks each on the stack it runs on. Horovod itself is imported
by exchange.collectives alone, which hands the Horovod modules to the functions here that need them.
"""
import importlib.metadata
import re

import tensorflow as tf

# The names and texts this module touches, for the test that nothing else does.
PRIVATE_NAMES = ("_update_step", "_accumulators", "_index_dict", "_var_key", "_allreduce_grads", "_write",
                 "optimizer/_variables", "optimizer/_iterations", "run_fn", ".ATTRIBUTES/VARIABLE_VALUE",
                 "{{node Horovod", "_coalesced_children")


def describe_stack():
    """The stack of stacks/ this TensorFlow belongs to, and what its parts are, e.g.
    'stack 2.20 (TensorFlow 2.20.0, tf-keras 2.20.1)': what a run's first line names."""
    keras_package = tf.keras.optimizers.Adagrad.__module__.split(".")[0]
    keras = f"{keras_package.replace('_', '-')} {importlib.metadata.version(keras_package.replace('_', '-'))}"
    return f"stack {'.'.join(tf.__version__.split('.')[:2])} (TensorFlow {tf.__version__}, {keras})"


class KerasAdagrad(tf.keras.optimizers.Adagrad):
    """Keras's Adagrad whose update of each variable is the subclass's `update_variable`, for
    every variable apply_gradients is given, whether the optimizer was built on it or not.

    Relies on (Keras 2.15 and tf-keras 2.20, src/optimizers/optimizer.py): apply_gradients calls
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


def dynamic_loss_scaling(optimizer, initial_scale):
    """Keras's dynamic loss scaling around `optimizer` (LossScaleOptimizer), whose scale Keras
    attaches to `optimizer` as its checkpoint child 'loss_scale'.

    Relies on (tf-keras 2.20, tf_keras/src/optimizers/optimizer.py, _trackable_children): the
    optimizer makes the list of its checkpoint children once, at the first listing, and keeps it
    as `_coalesced_children`; a scale attached after a listing (a restore, a count of its
    variables) would be in no checkpoint until that list is dropped. Keras 2.15 lists them
    afresh each time and has no such attribute."""
    wrapper = tf.keras.mixed_precision.LossScaleOptimizer(optimizer, initial_scale=initial_scale)
    if hasattr(optimizer, "_coalesced_children"):
        del optimizer._coalesced_children
    return wrapper


def keras_optimizer_slot_key(index, root="optimizer"):
    """The checkpoint key of a Keras 2 optimizer's variable number `index` (0: iterations, then
    one accumulator per variable it was built on), saved as the attribute `_variables` of the
    object `root`: what an earlier checkpoint format of this trainer holds its slots under."""
    return checkpoint_value_key(f"{root}/_variables/{index}")


def keras_optimizer_iterations_key(root="optimizer"):
    """The checkpoint key of a Keras 2 optimizer's step count (its attribute `_iterations`)."""
    return checkpoint_value_key(f"{root}/_iterations")


def checkpoint_value_key(path):
    """The key under which TensorFlow's object checkpoint holds the value of the variable at
    `path` (its attributes from the root object, joined by '/': 'model/embedding/0').

    Relies on (TensorFlow 2.15 and 2.20, tensorflow/python/checkpoint/, trackable's
    `VARIABLE_VALUE_KEY` and the object graph's `.ATTRIBUTES` naming): a variable's value is
    saved as `PATH/.ATTRIBUTES/VARIABLE_VALUE`, the key tf.train.list_variables lists and
    TensorBoard's projector names a tensor by."""
    return f"{path}/.ATTRIBUTES/VARIABLE_VALUE"


class ManagedWrite:
    """What tf.train.CheckpointManager saves through, for a checkpoint that is not a
    tf.train.Checkpoint: `write(file_prefix)` writes it whole.

    Relies on (TensorFlow 2.15 and 2.20, checkpoint_management.py, CheckpointManager.save): the manager
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

    Relies on (TensorFlow 2.15 and 2.20 with Horovod 0.28.1): a Horovod op that fails inside a traced
    function raises tf.errors.UnknownError whose message names Horovod (its op, 'HorovodAllreduce_...',
    or its status text, 'Horovod has been shut down')."""
    return isinstance(err, tf.errors.UnknownError) and "Horovod" in err.message


def horovod_failure_cause(message):
    """The op kind and the cause in a failed Horovod op's message ('HorovodAllgather: Timed out
    waiting 30000ms for recv operation to complete'), else its first line.

    Relies on (TensorFlow 2.15 and 2.20 with Horovod 0.28.1): TensorFlow puts the op's error text on the
    line before its node, '[[{{node HorovodAllgather_...}}]]', and Horovod's text starts with its
    source location in brackets ('[horovod/common/...:123] ') and ends with sentences of advice."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    at = next((index for index, line in enumerate(lines) if "{{node Horovod" in line), None)
    if at is None:
        return lines[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[at - 1] if at > 0 else "").split(". ")[0]
    kind = re.search(r"\{\{node (Horovod[A-Za-z]+)", lines[at]).group(1)
    return f"{kind}: {cause}" if cause else kind
