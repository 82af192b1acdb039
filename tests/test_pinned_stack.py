"""The private parts of the stack that lm1b_hvd.pinned_stack relies on, each checked on the stack
these tests run on (2.15 or 2.20): a TensorFlow, Keras or Horovod that moved one fails here, by
name, before a training run fails somewhere less clear."""
import pathlib
import re

import numpy as np
import tensorflow as tf

from lm1b_hvd import pinned_stack

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_stack_is_one_of_the_pinned_ones_with_keras_2():
    described = pinned_stack.describe_stack()
    match = re.fullmatch(r"stack (\d+\.\d+) \(TensorFlow ([\d.]+), (keras|tf-keras) (2\.[\d.]+)\)", described)
    assert match, described
    stack, tf_version = match.group(1), match.group(2)
    pins = (REPO_ROOT / "stacks" / stack / "requirements.txt").read_text()
    assert f"tensorflow-cpu=={tf_version}\n" in pins, (described, pins)
    if match.group(3) == "tf-keras":
        assert f"tf-keras=={match.group(4)}\n" in pins


class Recorded(pinned_stack.KerasAdagrad):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.updated = []

    def update_variable(self, gradient, variable):
        self.updated.append(variable.name)
        variable.assign_sub(gradient)


def test_keras_adagrad_updates_every_variable_through_update_variable_and_shows_its_accumulators():
    built_on, other = tf.Variable([1.0, 2.0], name="built_on"), tf.Variable([3.0], name="other")
    optimizer = Recorded(learning_rate=0.1, initial_accumulator_value=0.5)
    optimizer.build([built_on])
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), built_on), (tf.constant([1.0]), other)])
    assert sorted(optimizer.updated) == ["built_on:0", "other:0"]
    np.testing.assert_array_equal(other.numpy(), [2.0])
    np.testing.assert_array_equal(optimizer.accumulator_of(built_on).numpy(), [0.5, 0.5])
    assert [a.shape for a in optimizer.accumulators()] == [built_on.shape]


def test_checkpoint_keys_of_a_variable_and_of_a_keras_optimizer(tmp_path):
    variable = tf.Variable([1.0, 2.0])
    optimizer = tf.keras.optimizers.Adagrad(0.1)
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), variable)])
    prefix = tf.train.Checkpoint(model=tf.train.Checkpoint(v=variable), optimizer=optimizer).write(
        str(tmp_path / "ckpt"))
    keys = {name for name, _ in tf.train.list_variables(prefix)}
    assert pinned_stack.checkpoint_value_key("model/v") in keys
    assert pinned_stack.keras_optimizer_iterations_key() in keys
    assert pinned_stack.keras_optimizer_slot_key(1) in keys, sorted(keys)


def test_the_checkpoint_manager_writes_through_managed_write_and_keeps_its_record(tmp_path):
    variable = tf.Variable(7.0)
    save_counter = tf.Variable(0, dtype=tf.int64)
    written = []

    def write(prefix):
        written.append(tf.train.Checkpoint(v=variable).write(prefix))

    manager = tf.train.CheckpointManager(pinned_stack.ManagedWrite(write, save_counter), str(tmp_path),
                                         max_to_keep=1)
    first, second = manager.save(checkpoint_number=5), manager.save(checkpoint_number=9)
    assert written == [first, second] and second.endswith("ckpt-9")
    assert tf.train.latest_checkpoint(str(tmp_path)) == second
    assert not list(tmp_path.glob("ckpt-5.*")), "the manager no longer deletes the oldest"
    assert int(save_counter.numpy()) == 2


def test_horovods_tape_reduces_through_its_allreduce_grads_and_its_elastic_loop_is_there():
    import horovod.tensorflow as hvd
    from horovod.common import elastic
    with tf.GradientTape() as tape:
        pass
    distributed = hvd.DistributedGradientTape(tape)
    seen = []
    observed = pinned_stack.observe_tape_reduction(distributed, lambda local, reduced: seen.append(local))
    assert callable(observed._allreduce_grads)
    assert callable(elastic.run_fn) and hasattr(elastic.State, "commit")
    assert "bcast_object" in elastic.State.__init__.__code__.co_varnames


def test_a_failed_horovod_ops_text_gives_its_kind_and_cause():
    message = ("[horovod/common/operations.cc:123] Timed out waiting 30000ms for recv operation to complete. "
               "Advice follows.\n\t [[{{node HorovodAllgather_grads_0}}]]")
    assert pinned_stack.horovod_failure_cause(message) == (
        "HorovodAllgather: Timed out waiting 30000ms for recv operation to complete")


def test_loss_scaling_attached_after_the_optimizer_was_listed_is_in_its_checkpoint(tmp_path):
    optimizer = tf.keras.optimizers.Adagrad(0.1)
    tf.train.TrackableView(optimizer).descendants()  # a listing, as a restore or a count of its variables makes
    pinned_stack.dynamic_loss_scaling(optimizer, initial_scale=2 ** 10)
    prefix = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(prefix)]
    assert any(name.startswith("optimizer/loss_scale/") for name in names), names
