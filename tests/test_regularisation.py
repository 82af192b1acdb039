"""The regularisation options (tied embeddings, variational dropout, embedding dropout, DropConnect
on the recurrent weights, the learning rate's plateau decay, the tables' average), alone and
together, on the original LSTM, F-LSTM and G-LSTM: a training step's gradients equal autodiff of
the textbook model with the same masks, on the portable ops and on the CPU kernels."""
import math

import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd import hparams
from lm1b_hvd.exchange.gradients import Traffic
from lm1b_hvd.model import regularisation
from lm1b_hvd.model.averaging import evaluation_weights
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.model.ops import FORGET_BIAS
from lm1b_hvd.model.step_seeds import RECURRENT_DROPOUT_STREAM, step_seed, sub_seed
from lm1b_hvd.ranks import ONE_PROCESS
from lm1b_hvd.run import checkpoints
from lm1b_hvd.run.checkpoints import CheckpointParts
from lm1b_hvd.run.position import RunPoint
from lm1b_hvd.run.state import TrainingState
from lm1b_hvd.update.optimizer import PlateauDecay
from lm1b_hvd.update.step import Trainer
from tests.model_helpers import needs_cpu_kernels, tiny_hparams, whole

VOCAB = 40


def tiny(**changes):
    # The full softmax (num_sampled=0), whose textbook form is one cross-entropy; one shard; two
    # layers; emb_size == projected_size, for tied embeddings.
    return tiny_hparams(**{**dict(num_steps=5, num_shards=1, num_layers=2, emb_size=6, state_size=8, num_sampled=0,
                                  kernels="portable"), **changes})


def batch(seed=0):
    rng = np.random.default_rng(seed)
    # Few distinct words, so that a dropped word occurs more than once.
    x, y = (rng.integers(0, 12, (3, 5)).astype(np.int32) for _ in range(2))
    w = np.ones((3, 5), np.float32)
    w[1, 3:] = 0.0
    return x, y, w


def site_mask(hps, seed, site, steps, width):
    """keep_prob's mask at dropout site `site`, drawn as the model draws it."""
    shape = [1 if hps.variational_dropout else steps, hps.batch_size, width]
    return tf.nn.experimental.stateless_dropout(tf.ones(shape), rate=1.0 - hps.keep_prob, seed=sub_seed(seed, 1 + site))


def textbook_gates(hps, weight, factor, x, h):
    """The gate pre-activations of [x, h]: one matrix, f-lm's two factors, or f-lm's groups."""
    xh = tf.concat([x, h], axis=1)
    if factor is not None:
        return xh @ weight @ factor
    if weight.shape.rank == 2:
        return xh @ weight
    groups = weight.shape[0]
    parts = [[], [], [], []]
    for g in range(groups):
        x_g, h_g = tf.split(x, groups, axis=1)[g], tf.split(h, groups, axis=1)[g]
        for gate, part in zip(parts, tf.split(tf.concat([x_g, h_g], 1) @ weight[g], 4, axis=1)):
            gate.append(part)
    return tf.concat([tf.concat(gate, axis=1) for gate in parts], axis=1)


def drop_connect(hps, weight, layer, inputs, seed):
    """Merity et al.'s weight drop: the recurrent rows of the gate matrix masked for the window."""
    if hps.recurrent_keep_prob >= 1.0:
        return weight
    axis, split = (1, inputs // hps.lstm_groups) if weight.shape.rank == 3 else (0, inputs)
    given, recurrent = tf.split(weight, [split, weight.shape[axis] - split], axis=axis)
    mask = tf.nn.experimental.stateless_dropout(tf.ones_like(recurrent), rate=1.0 - hps.recurrent_keep_prob,
                                                seed=sub_seed(seed, RECURRENT_DROPOUT_STREAM + layer))
    return tf.concat([given, recurrent * mask], axis=axis)


def textbook_loss(hps, params, x, y, w, seed, word_scale):
    """The training loss of the textbook model, with the input and the softmax embedding as
    separate tensors (`embedding_in`, `embedding_out`), so that a tied model's two paths show."""
    ids = tf.transpose(x)
    table = params["embedding_in"]
    if hps.emb_keep_prob < 1.0:  # Merity et al.'s embedded_dropout: whole rows of the matrix
        table = table * word_scale[:, None]
    inputs = tf.gather(table, ids) * site_mask(hps, seed, 0, hps.num_steps, hps.emb_size)
    for layer in range(hps.num_layers):
        in_size = inputs.shape[-1]
        weight = drop_connect(hps, params[f"weight{layer}"], layer, in_size, seed)
        factor, bias, projection = params.get(f"factor{layer}"), params[f"bias{layer}"], params[f"projection{layer}"]
        c, h = tf.zeros([hps.batch_size, hps.state_size]), tf.zeros([hps.batch_size, hps.projected_size])
        outputs = []
        for t in range(hps.num_steps):
            i, j, f, o = tf.split(textbook_gates(hps, weight, factor, inputs[t], h) + bias, 4, axis=1)
            c = tf.sigmoid(f + FORGET_BIAS) * c + tf.sigmoid(i) * tf.tanh(j)
            h = (tf.sigmoid(o) * tf.tanh(c)) @ projection
            outputs.append(h)
        inputs = tf.stack(outputs) * site_mask(hps, seed, layer + 1, hps.num_steps, hps.projected_size)
    logits = inputs @ tf.transpose(params["embedding_out"]) + params["softmax_b"]
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.transpose(y), logits=logits)
    return tf.reduce_sum(losses * tf.transpose(w)) / hps.batch_size


def dense(gradient):
    return tf.convert_to_tensor(gradient).numpy()


def trainer_gradients(hps):
    """{name: gradient} of one training step of the model (before the step's scaling and clip),
    and the model's initial values under the same names."""
    trainer = Trainer(TrainingState(LSTMPLanguageModel(hps, VOCAB)))
    model = trainer.model
    x, y, w = batch()
    _, _, gradients = trainer.gradients(x, y, w, model.zero_state(hps.batch_size), Traffic())
    names = (["embedding"] + [f"weight{k}" for k in range(hps.num_layers)]
             + [f"factor{k}" for k in range(len(model.lstm_factors))] + [f"bias{k}" for k in range(hps.num_layers)]
             + [f"projection{k}" for k in range(hps.num_layers)] + ([] if model.tied else ["softmax_w"])
             + ["softmax_b"])
    values = {name: variable.numpy() for name, variable in zip(names, model.all_variables)}
    got = {name: dense(g) for name, g in zip(names, gradients)}
    return trainer, got, values, step_seed(hps.seed, 0, trainer.state.step)


CASES = {
    "tied": dict(tie_embeddings=True),
    "variational": dict(variational_dropout=True, keep_prob=0.7),
    "embedding dropout": dict(emb_keep_prob=0.6),
    "dropconnect": dict(recurrent_keep_prob=0.6),
    "dropconnect f-lstm": dict(recurrent_keep_prob=0.6, lstm_factor=3),
    "dropconnect g-lstm": dict(recurrent_keep_prob=0.6, lstm_groups=2),
    "all": dict(tie_embeddings=True, variational_dropout=True, keep_prob=0.7, emb_keep_prob=0.6,
                recurrent_keep_prob=0.6),
    "all g-lstm": dict(tie_embeddings=True, variational_dropout=True, keep_prob=0.7, emb_keep_prob=0.6,
                       recurrent_keep_prob=0.6, lstm_groups=2),
}


@pytest.mark.parametrize("kernels", ["portable", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_steps_gradients_are_autodiff_of_the_textbook_model(case, kernels):
    hps = tiny(kernels=kernels, **CASES[case])
    trainer, got, values, seed = trainer_gradients(hps)
    x, y, w = batch()
    params = {name: tf.constant(value) for name, value in values.items() if name not in ("embedding", "softmax_w")}
    params["embedding_in"] = tf.constant(values["embedding"])
    params["embedding_out"] = tf.constant(values["embedding" if trainer.model.tied else "softmax_w"])
    with tf.GradientTape() as tape:
        tape.watch(list(params.values()))
        loss = textbook_loss(hps, params, x, y, w, seed, regularisation.word_keep_scale(hps, VOCAB, seed))
    expected = dict(zip(params, tape.gradient(loss, list(params.values()))))
    embedding_in, embedding_out = dense(expected.pop("embedding_in")), dense(expected.pop("embedding_out"))
    if trainer.model.tied:
        expected["embedding"] = embedding_in + embedding_out
    else:
        expected["embedding"], expected["softmax_w"] = embedding_in, embedding_out
    assert sorted(expected) == sorted(got)
    for name in expected:
        np.testing.assert_allclose(got[name], dense(expected[name]), rtol=2e-4, atol=2e-6, err_msg=f"{case}: {name}")


def test_variational_masks_are_one_per_row_shared_by_the_windows_steps():
    hps = tiny(variational_dropout=True, keep_prob=0.5, batch_size=64)
    chunks = [tf.ones([2, 64, 6]), tf.ones([3, 64, 6])]
    seed = tf.constant([1, 7], tf.int64)
    steps = tf.concat(regularisation.dropout(chunks, hps, seed, 0), axis=0).numpy()
    assert np.all(steps == steps[:1]), "every step of a row has the row's mask"
    assert set(np.unique(steps)) == {0.0, 2.0} and 0.35 < np.mean(steps[0] == 0) < 0.65
    assert not np.array_equal(steps[0, 0], steps[0, 1]), "rows have masks of their own"
    later = tf.concat(regularisation.dropout(chunks, hps, tf.constant([1, 8], tf.int64), 0), axis=0).numpy()
    assert not np.array_equal(steps[0], later[0]), "the next step's window draws new masks"
    plain = tf.concat(regularisation.dropout(chunks, tiny(keep_prob=0.5, batch_size=64), seed, 0), axis=0).numpy()
    assert not np.array_equal(plain[0], plain[1]), "without it, a mask per step"


def test_embedding_dropout_drops_every_occurrence_of_a_dropped_word():
    model = LSTMPLanguageModel(tiny(emb_keep_prob=0.5), VOCAB)
    x = np.tile(np.arange(12, dtype=np.int32), (3, 1))[:, :5]
    x[2] = x[0]  # each word several times
    seed = tf.constant([3, 4], tf.int64)
    dropped = model.embed(x, seed=seed).numpy()
    whole = model.embed(x).numpy()
    scale = regularisation.word_keep_scale(model.hps, VOCAB, seed).numpy()
    assert set(np.unique(scale)) == {0.0, 2.0}
    for row, step in np.ndindex(x.shape):
        np.testing.assert_allclose(dropped[step, row], whole[step, row] * scale[x[row, step]], rtol=1e-6)
    assert np.any(scale[np.unique(x)] == 0.0) and np.any(scale[np.unique(x)] == 2.0)


def test_dropconnect_masks_only_the_recurrent_rows_and_only_in_training():
    model = LSTMPLanguageModel(tiny(recurrent_keep_prob=0.5), VOCAB)
    seed = tf.constant([5, 6], tf.int64)
    stored = model.layer_weights(0).weight.numpy()
    masked = regularisation.drop_connect(model.layer_weights(0), model.hps, 0, seed).weight.numpy()
    np.testing.assert_array_equal(masked[:6], stored[:6])  # the input rows (emb_size 6)
    recurrent = masked[6:] / stored[6:]
    assert set(np.round(np.unique(recurrent), 5)) == {0.0, 2.0}
    outputs, _ = model.forward(batch()[0], model.zero_state(3), training=False)
    again, _ = model.forward(batch()[0], model.zero_state(3), training=False)
    np.testing.assert_array_equal(outputs.numpy(), again.numpy())


def test_tied_checkpoints_hold_one_embedding_and_say_so(tmp_path):
    hps = tiny(tie_embeddings=True)
    state = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    assert state.model.softmax_w == state.model.embedding
    path = state.write(str(tmp_path / "ckpt-1"))
    names = dict(tf.train.list_variables(path))
    assert "tables/embedding" in names and "tables/embedding/adagrad_accumulator" in names
    assert not any(name.startswith("tables/softmax_w") for name in names)
    checkpoints.check_or_write_hparams(str(tmp_path), hps, VOCAB, write=True)
    assert checkpoints.load_run_hparams(str(tmp_path)).tie_embeddings
    with pytest.raises(checkpoints.CheckpointError, match="'tie_embeddings' is True in this log directory but False"):
        checkpoints.check_or_write_hparams(str(tmp_path), hps.replace(tie_embeddings=False), VOCAB, write=False)


def test_an_hparams_file_from_before_the_options_reads_as_their_defaults(tmp_path):
    (tmp_path / "hparams.json").write_text('{"num_shards": 1, "num_layers": 2, "emb_size": 6, "state_size": 8, '
                                           '"projected_size": 6, "vocab_size": 40}')
    checkpoints.check_or_write_hparams(str(tmp_path), tiny(), VOCAB, write=False)
    with pytest.raises(checkpoints.CheckpointError, match="'lstm_groups' is 1 in this log directory but 2 now"):
        checkpoints.check_or_write_hparams(str(tmp_path), tiny(lstm_groups=2), VOCAB, write=False)


@pytest.mark.parametrize("override, message", [
    ("tie_embeddings=true,emb_size=8", "'tie_embeddings' needs emb_size == projected_size, got 8 and 6"),
    ("lstm_groups=4", "'lstm_groups=4' must divide 'emb_size' (6)"),
    ("lstm_factor=3,lstm_groups=2", "'lstm_factor' and 'lstm_groups' cannot be combined"),
    ("recurrent_keep_prob=0", "'recurrent_keep_prob' must be in (0, 1], got 0.0"),
    ("emb_keep_prob=1.5", "'emb_keep_prob' must be in (0, 1], got 1.5"),
    ("lr_decay=0", "'lr_decay' must be in (0, 1], got 0.0"),
    ("lr_patience=0", "'lr_patience' must be >= 1, got 0"),
    ("lstm_factor=-1", "'lstm_factor' must be >= 0"),
])
def test_options_that_do_not_fit_are_one_line_naming_the_key(override, message):
    with pytest.raises(hparams.HParamsError) as error:
        hparams.parse_overrides(tiny(), override)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_learning_rate_decays_after_patience_evaluations_without_a_new_best():
    optimizer = tf.keras.optimizers.Adagrad(learning_rate=0.2)
    schedule = PlateauDecay(optimizer, decay=0.5, patience=2)
    said = [schedule.after_evaluation(p) for p in (100.0, 90.0, 95.0, 91.0, 92.0, 89.0, 89.0, 89.5)]
    assert [line is not None for line in said] == [False, False, False, True, False, False, False, True]
    assert "learning rate 0.2 -> 0.1 (lr_decay): no better heldout perplexity than 90.00 in 2 evaluation(s)" in said[3]
    assert math.isclose(schedule.learning_rate, 0.05, rel_tol=1e-6)
    constant = PlateauDecay(tf.keras.optimizers.Adagrad(learning_rate=0.2), decay=1.0, patience=1)
    assert all(constant.after_evaluation(p) is None for p in (100.0, 101.0, 102.0))
    assert math.isclose(constant.learning_rate, 0.2, rel_tol=1e-6)


def test_the_schedule_resumes_from_the_checkpoint(tmp_path):
    """The rate (the optimizer's) and the best and its count (the run position's) come back."""
    hps = tiny(lr_decay=0.5, lr_patience=2)
    state = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    for perplexity in (50.0, 60.0, 61.0, 62.0):  # a decay after 61, one evaluation counted since
        state.lr_schedule.after_evaluation(perplexity)
    run = checkpoints.RunCheckpoints(str(tmp_path), state, keep=2, ranks=ONE_PROCESS, parts=CheckpointParts())
    run.save(RunPoint.start(7, state.model))
    resumed = TrainingState(LSTMPLanguageModel(hps, VOCAB))
    checkpoints.RunCheckpoints(str(tmp_path), resumed, keep=2, ranks=ONE_PROCESS,
                               parts=CheckpointParts()).restore(lambda _: None)
    assert math.isclose(resumed.lr_schedule.learning_rate, 0.1, rel_tol=1e-6)
    assert resumed.lr_schedule.state() == {"best": 50.0, "evaluations_without_best": 1}
    assert resumed.lr_schedule.after_evaluation(55.0) is not None  # the second evaluation without a best


def test_averaged_tables_follow_the_ema_and_evaluation_reads_them():
    """average_tables: after each step every table's average moves (1 - ema_decay) of the way to
    the table, as the LSTM's do; evaluation's weights are the averages, training's come back."""
    hps = tiny(tie_embeddings=True, average_tables=True, ema_decay=0.7, num_shards=2)
    trainer = Trainer(TrainingState(LSTMPLanguageModel(hps, VOCAB)))
    expected = [whole(table).astype(np.float64) for table in trainer.model.tables]
    state = trainer.model.zero_state(hps.batch_size)
    for step in range(4):
        state, _ = trainer.step(*batch(step), state)
        for average, table in zip(expected, trainer.model.tables):
            average -= (1.0 - hps.ema_decay) * (average - whole(table))
    trained = [whole(table) for table in trainer.model.tables]
    for average, shadow, weights in zip(expected, trainer.state.ema.table_shadows, trained):
        np.testing.assert_allclose(whole(shadow), average, rtol=0, atol=1e-6)
        assert np.abs(weights - average).max() > 1e-3, "the average lags the weights"
    with evaluation_weights(trainer.state.ema, hps):
        for table, average in zip(trainer.model.tables, expected):
            np.testing.assert_allclose(whole(table), average, rtol=0, atol=1e-6)
    for table, weights in zip(trainer.model.tables, trained):
        np.testing.assert_array_equal(whole(table), weights)
