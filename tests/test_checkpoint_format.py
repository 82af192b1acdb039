"""A checkpoint holds the vocabulary tables as whole logical matrices, whatever layout wrote them,
and a checkpoint of the earlier format (tables as the model's block variables, their Adagrad slots
in the Keras optimizer) still restores, weights and slots."""
import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd.model import tables
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.model.pieces import AVERAGE_SUFFIX as AVERAGE
from lm1b_hvd.model.tables import VocabularyTables
from lm1b_hvd.run.state import TrainingState
from lm1b_hvd.update.step import Trainer
from tests.model_helpers import tiny_hparams, whole

VOCAB = 31


def trained(hps, steps=3):
    """A training state after a few steps, so that weights and slots differ from their initial values."""
    state = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    trainer = Trainer(state)
    rng = np.random.default_rng(0)
    row_state = state.model.zero_state(hps.batch_size)
    for _ in range(steps):
        x, y = (rng.integers(0, VOCAB, (hps.batch_size, hps.num_steps)).astype(np.int32) for _ in range(2))
        row_state, _ = trainer.step(x, y, np.ones(x.shape, np.float32), row_state)
    return state


def restored_state(hps, path):
    """A new training state of `hps` with the checkpoint at `path` restored into it."""
    state = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    state.restore(path)
    return state


def test_tables_are_whole_logical_matrices_in_the_checkpoint(tmp_path):
    state = trained(tiny_hparams())
    path = state.write(str(tmp_path / "ckpt-3"))
    shapes = dict(tf.train.list_variables(path))
    assert shapes["tables/embedding"] == [VOCAB, 8] and shapes["tables/softmax_w"] == [VOCAB, 6]
    assert shapes["tables/softmax_b"] == [VOCAB] and shapes["tables/embedding/adagrad_accumulator"] == [VOCAB, 8]
    assert not any(name.startswith("model/embedding") for name in shapes), "no block variables of the layout"
    reader = tf.train.load_checkpoint(path)
    for name, table, accumulators in zip(VocabularyTables.NAMES, state.model.tables, state.table_accumulators):
        key = tables.KEY_PREFIX + name
        np.testing.assert_array_equal(reader.get_tensor(key), whole(table))
        np.testing.assert_array_equal(reader.get_tensor(key + "/adagrad_accumulator"), whole(accumulators))
    assert not (tmp_path / "ckpt-3_parts").exists(), "the parts are merged into the checkpoint"


@pytest.mark.parametrize("num_shards", [1, 4])
def test_another_layout_restores_the_same_matrices(tmp_path, num_shards):
    source = trained(tiny_hparams())
    path = source.write(str(tmp_path / "ckpt"))
    other = restored_state(tiny_hparams(num_shards=num_shards, seed=7), path)
    for mine, theirs in zip(list(other.model.tables) + other.table_accumulators,
                            list(source.model.tables) + source.table_accumulators):
        np.testing.assert_array_equal(whole(mine), whole(theirs))
    assert int(other.step) == 3


def test_averaged_tables_are_logical_matrices_and_restore_in_another_layout(tmp_path):
    source = trained(tiny_hparams(average_tables=True, ema_decay=0.5))
    path = source.write(str(tmp_path / "ckpt"))
    reader = tf.train.load_checkpoint(path)
    for (name, table), average in zip(source.model.tables.named(), source.ema.table_shadows):
        saved = reader.get_tensor(tables.KEY_PREFIX + name + AVERAGE)
        np.testing.assert_array_equal(saved, whole(average))
        assert np.abs(saved - whole(table)).max() > 1e-4, f"{name}: the average lags the weights"
    other = restored_state(tiny_hparams(average_tables=True, ema_decay=0.5, num_shards=4, seed=7), path)
    for mine, theirs in zip(other.ema.table_shadows, source.ema.table_shadows):
        np.testing.assert_array_equal(whole(mine), whole(theirs))


def test_a_checkpoint_without_table_averages_starts_them_at_its_weights(tmp_path):
    source = trained(tiny_hparams())
    path = source.write(str(tmp_path / "ckpt"))
    assert not any(name.endswith(AVERAGE) for name, _ in tf.train.list_variables(path))
    averaging = restored_state(tiny_hparams(average_tables=True, seed=7), path)
    for average, table in zip(averaging.ema.table_shadows, source.model.tables):
        np.testing.assert_array_equal(whole(average), whole(table))


def test_a_table_of_some_rows_reads_only_those(tmp_path):
    source = trained(tiny_hparams())
    path = source.write(str(tmp_path / "ckpt"))
    rows = tables.Rows(10, 20)
    part = tables.VocabTable("emb", VOCAB, 8, [(rows, tf.Variable(tf.zeros([10, 8])))])
    part.restore(path, "tables/embedding")
    np.testing.assert_array_equal(part.variables[0].numpy(), whole(source.model.tables.embedding)[10:20])


class EarlierModel(tf.Module):
    """The earlier layout of the model's variables: the tables as lists of block variables."""

    def __init__(self, model):
        super().__init__(name="lm")
        self.embedding = [tf.Variable(v) for v in model.embedding]
        self.lstm_weights = [tf.Variable(v) for v in model.lstm_weights]
        self.lstm_biases = [tf.Variable(v) for v in model.lstm_biases]
        self.lstm_projections = [tf.Variable(v) for v in model.lstm_projections]
        self.softmax_w = [tf.Variable(v) for v in model.softmax_w]
        self.softmax_b = tf.Variable(model.softmax_b)

    @property
    def all_variables(self):
        return (self.embedding + self.lstm_weights + self.lstm_biases + self.lstm_projections + self.softmax_w
                + [self.softmax_b])


def test_a_checkpoint_of_the_earlier_format_restores_weights_and_slots(tmp_path):
    source = trained(tiny_hparams())
    earlier = EarlierModel(source.model)
    optimizer = tf.keras.optimizers.Adagrad(0.2, initial_accumulator_value=1.0, epsilon=0.0)
    optimizer.build(earlier.all_variables)
    # The earlier optimizer's slots: every variable's, in all_variables order.
    rng = np.random.default_rng(5)
    for accumulator in optimizer.variables[1:]:
        accumulator.assign(rng.uniform(1.0, 2.0, accumulator.shape).astype(np.float32))
    optimizer.iterations.assign(42)
    path = tf.train.Checkpoint(model=earlier, optimizer=optimizer, ema_shadows=source.ema.shadows).write(
        str(tmp_path / "ckpt-42"))
    assert not tables.holds_tables(path)

    restored = restored_state(tiny_hparams(seed=9), path)
    assert int(restored.step) == 42
    blocks = len(earlier.embedding)
    old_slots = [v.numpy() for v in optimizer.variables[1:]]  # slot i is all_variables[i]'s
    lstm = len(earlier.lstm_weights) * 3
    np.testing.assert_array_equal(whole(restored.model.tables.embedding), whole(source.model.tables.embedding))
    np.testing.assert_array_equal(whole(restored.table_accumulators[0]),
                                  np.concatenate(old_slots[:blocks])[:VOCAB])
    np.testing.assert_array_equal(whole(restored.table_accumulators[1]),
                                  np.concatenate(old_slots[blocks + lstm:2 * blocks + lstm])[:VOCAB])
    np.testing.assert_array_equal(whole(restored.table_accumulators[2]), old_slots[-1])
    for mine, theirs in zip(restored.optimizer.accumulators(), old_slots[blocks:blocks + lstm]):
        np.testing.assert_array_equal(mine.numpy(), theirs)
    for mine, theirs in zip(restored.model.lstm_variables, source.model.lstm_variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
