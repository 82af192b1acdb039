import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd.model import compute_plan
from lm1b_hvd.model.candidates import draw as draw_candidates, unique_log_uniform_candidates
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.update.step import sum_duplicates
from tests.model_helpers import sampled_softmax_losses, tiny_hparams, true_logits

VOCAB = 31  # not a multiple of num_shards: the last shard is padded


def tiny(**changes):
    return tiny_hparams(num_layers=2, **changes)


def batch(seed, hps):
    rng = np.random.default_rng(seed)
    shape = (hps.batch_size, hps.num_steps)
    return rng.integers(0, VOCAB, shape).astype(np.int32), rng.integers(0, VOCAB, shape).astype(np.int32)


def test_shapes_and_div_sharding():
    hps = tiny()
    model = LSTMPLanguageModel(hps, VOCAB)
    assert model.rows_per_shard == 11
    assert [v.shape.as_list() for v in model.embedding] == [[11, 8]] * 3
    assert model.softmax_matrix().shape == (VOCAB, 6)
    # "div" strategy: word k is row k % 11 of shard k // 11, for the lookup the model uses.
    for k in (0, 10, 11, 21, 30):
        looked_up = tf.nn.embedding_lookup(model.embedding, tf.constant([k])).numpy()[0]
        np.testing.assert_array_equal(looked_up, model.embedding[k // 11].numpy()[k % 11])
    x, _ = batch(0, hps)
    outputs, state = model.forward(x, model.zero_state(3), training=False)
    assert outputs.shape == (3, 4, 6) and len(state) == 2 and state[1][0].shape == (3, 12)


def test_full_softmax_logit_equals_sampled_softmax_true_logit():
    hps = tiny()
    model = LSTMPLanguageModel(hps, VOCAB)
    x, y = batch(1, hps)
    outputs, _ = model.forward(x, model.zero_state(3), training=False)
    full_logits = tf.matmul(tf.reshape(outputs, [-1, 6]), model.softmax_matrix(), transpose_b=True) + model.softmax_b
    picked = tf.gather(full_logits, tf.reshape(y, [-1]), batch_dims=1).numpy()
    np.testing.assert_allclose(tf.reshape(true_logits(model, outputs, y), [-1]).numpy(), picked, atol=1e-5)


def test_sampled_softmax_over_every_word_is_the_full_softmax():
    """With every word as a candidate and expected counts 1, removing the accidental hit of the
    target leaves exactly the full softmax: same shards, same order, same loss."""
    every_word = tf.range(VOCAB, dtype=tf.int64)

    def all_candidates(labels):
        return every_word, tf.ones(tf.shape(labels), tf.float32), tf.ones([VOCAB], tf.float32)

    hps = tiny(num_sampled=VOCAB)
    model = LSTMPLanguageModel(hps, VOCAB, candidate_sampler=all_candidates)
    x, y = batch(2, hps)
    outputs, _ = model.forward(x, model.zero_state(3), training=False)
    np.testing.assert_allclose(sampled_softmax_losses(model, outputs, y).numpy(),
                               model.full_softmax_losses(outputs, y).numpy(), rtol=1e-5, atol=1e-5)


def test_softmax_rows_have_the_same_shapes_every_step():
    """Every shape the sampled softmax's compiled part receives is known when the step is traced,
    the accidental hits' included: XLA compiles again for each new shape (a step took ~60x
    longer when the hits came as a list of varying length)."""
    hps = tiny()
    model = LSTMPLanguageModel(hps, VOCAB)
    traced = tf.function(model.softmax_rows).get_concrete_function(
        tf.TensorSpec([3, 4], tf.int32), tf.TensorSpec([2], tf.int64))
    assert all(t.shape.is_fully_defined() for t in tf.nest.flatten(traced.structured_outputs))
    x, y = batch(5, hps)
    hits = model.softmax_rows(y, tf.constant([1, 7])).hit_columns.numpy()
    candidates, _, _ = draw_candidates(tf.reshape(tf.cast(tf.transpose(y), tf.int64), [-1, 1]), tf.constant([1, 7]),
                                       hps.num_sampled, VOCAB)
    # Per time-major token: the column holding its target word among the candidates, else -1.
    expected = [list(candidates.numpy()).index(word) if word in candidates.numpy() else -1
                for word in np.transpose(y).reshape(-1)]
    np.testing.assert_array_equal(hits, expected)
    assert (hits >= 0).any() and (hits < 0).any()


def test_dropout_only_in_training_and_state_is_carried():
    hps = tiny(keep_prob=0.5)
    model = LSTMPLanguageModel(hps, VOCAB)
    x, _ = batch(3, hps)
    a, _ = model.forward(x, model.zero_state(3), training=False)
    b, _ = model.forward(x, model.zero_state(3), training=False)
    c, _ = model.forward(x, model.zero_state(3), training=True, seed=tf.constant([1, 7]))
    c_again, _ = model.forward(x, model.zero_state(3), training=True, seed=tf.constant([1, 7]))
    c_next_step, _ = model.forward(x, model.zero_state(3), training=True, seed=tf.constant([1, 8]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())
    np.testing.assert_array_equal(c.numpy(), c_again.numpy())  # the masks come from the seed alone
    assert not np.allclose(c.numpy(), c_next_step.numpy())
    _, state = model.forward(x, model.zero_state(3), training=False)
    d, _ = model.forward(x, state, training=False)
    assert not np.allclose(a.numpy(), d.numpy())


def test_time_chunks_change_nothing_but_the_order_of_work():
    """Dropout masks, LSTM outputs and sampled losses in 1, 3 or 4 time chunks: the same numbers."""
    hps = tiny(keep_prob=0.5, num_steps=4)
    x, y = batch(5, hps)
    seed = tf.constant([1, 7])

    def losses_and_outputs(chunks):
        plan = dataclasses.replace(compute_plan.choose(hps), time_chunks=chunks)
        model = LSTMPLanguageModel(hps, VOCAB, plan=plan)
        output_chunks, _ = model.run_layers(model.embed(x), model.zero_state(3), True, seed)
        assert len(output_chunks) == chunks
        rows = model.softmax_rows(y, seed)
        return model.sampled_losses(output_chunks, rows).numpy(), tf.concat(output_chunks, 0).numpy()

    whole = losses_and_outputs(1)
    for chunks in (3, 4):
        for got, expected in zip(losses_and_outputs(chunks), whole):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_weights_copied_between_shard_counts_give_the_same_model():
    """copy_weights_from moves the whole matrices: 3 shards (the last padded) to 1 and to 4."""
    source = LSTMPLanguageModel(tiny(), VOCAB)
    x, y = batch(6, source.hps)
    expected = source.full_log_probs(source.forward(x, source.zero_state(3), training=False)[0]).numpy()
    for shards in (1, 4):
        copy = LSTMPLanguageModel(tiny(num_shards=shards, seed=9), VOCAB)
        copy.copy_weights_from(source)
        np.testing.assert_array_equal(tf.concat(copy.embedding, 0)[:VOCAB].numpy(),
                                      tf.concat(source.embedding, 0)[:VOCAB].numpy())
        got = copy.full_log_probs(copy.forward(x, copy.zero_state(3), training=False)[0]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_sampled, range_max", [(64, 1000), (30, 40)])
def test_stateless_candidates_are_unique_log_uniform_with_tf_expected_counts(num_sampled, range_max):
    draws = 1500
    inclusion, expected = np.zeros(range_max), np.zeros(range_max)
    for step in range(draws):
        candidates, expected_count = unique_log_uniform_candidates(tf.constant([5, step]), num_sampled, range_max)
        candidates = candidates.numpy()
        assert len(set(candidates)) == num_sampled and candidates.min() >= 0 and candidates.max() < range_max
        inclusion[candidates] += 1
        expected += expected_count(tf.range(range_max)).numpy()
    again, _ = unique_log_uniform_candidates(tf.constant([5, 0]), num_sampled, range_max)
    first, _ = unique_log_uniform_candidates(tf.constant([5, 0]), num_sampled, range_max)
    np.testing.assert_array_equal(again.numpy(), first.numpy())
    # How often each id is drawn matches the expected count the loss corrects by (TF's formula).
    frequent = slice(0, 10)
    np.testing.assert_allclose(inclusion[frequent] / draws, expected[frequent] / draws, rtol=0.08, atol=0.02)
    assert abs(inclusion.sum() - expected.sum()) / inclusion.sum() < 0.05


def test_same_seed_same_weights_on_every_process():
    one, two = LSTMPLanguageModel(tiny(), VOCAB), LSTMPLanguageModel(tiny(), VOCAB)
    for a, b in zip(one.all_variables, two.all_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_duplicate_rows_are_summed_before_adagrad():
    gradient = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), tf.constant([4, 1, 4]),
                                tf.constant([6, 2]))
    merged = sum_duplicates(gradient)
    assert sorted(merged.indices.numpy().tolist()) == [1, 4]
    dense = tf.convert_to_tensor(merged).numpy()
    np.testing.assert_array_equal(dense, tf.convert_to_tensor(gradient).numpy())
    np.testing.assert_array_equal(dense[4], [6.0, 8.0])
    # Adagrad on the merged slices equals Adagrad on the dense sum: (1+5)^2, not 1^2 + 5^2.
    var = tf.Variable(tf.zeros([6, 2]))
    opt = tf.keras.optimizers.Adagrad(learning_rate=0.2, initial_accumulator_value=1.0, epsilon=0.0)
    opt.apply_gradients([(merged, var)])
    expected = -0.2 * dense / np.sqrt(1.0 + dense ** 2)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)


def test_sampled_softmax_loss_and_gradients_equal_tensorflows():
    """The hand-written sampled softmax is tf.nn.sampled_softmax_loss's math: same candidates,
    same log-expected-count correction, same removal of accidental hits (the candidates below
    include some targets), same gradients for the shards, the bias and the LSTM outputs."""
    candidates = tf.constant([0, 3, 7, 11, 12, 20, 30], tf.int64)

    def fixed(labels):
        true_expected = tf.cast(tf.reshape(labels, [-1, 1]) % 5 + 1, tf.float32) / 10.0
        return candidates, true_expected, tf.linspace(0.1, 0.9, 7)

    hps = tiny(num_sampled=7)
    model = LSTMPLanguageModel(hps, VOCAB, candidate_sampler=fixed)
    x, y = batch(4, hps)
    outputs, _ = model.forward(x, model.zero_state(3), training=False)
    weights = tf.cast(tf.reshape(tf.range(hps.batch_size * hps.num_steps), y.shape), tf.float32)

    def losses_and_gradients(loss_fn):
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            loss = tf.reduce_sum(loss_fn() * weights)
        grads = tape.gradient(loss, model.softmax_variables + [outputs])
        return loss, [tf.convert_to_tensor(g).numpy() for g in grads]

    def tensorflows():
        labels = tf.reshape(tf.cast(y, tf.int64), [-1, 1])
        losses = tf.nn.sampled_softmax_loss(
            weights=model.softmax_w, biases=model.softmax_b, labels=labels, inputs=tf.reshape(outputs, [-1, 6]),
            num_sampled=7, num_classes=VOCAB, sampled_values=fixed(labels), remove_accidental_hits=True)
        return tf.reshape(losses, y.shape)

    assert np.isin(y, candidates.numpy()).any(), "the batch has accidental hits to remove"
    ours, our_grads = losses_and_gradients(lambda: sampled_softmax_losses(model, outputs, y))
    theirs, their_grads = losses_and_gradients(tensorflows)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5)
    for a, b in zip(our_grads, their_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
