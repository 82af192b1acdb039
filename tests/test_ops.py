"""The hand-written LSTMP backward equals autodiff of the textbook per-step cell."""
import numpy as np
import tensorflow as tf

from lm1b_hvd import ops
from lm1b_hvd.ops import FORGET_BIAS, lstmp_layer

STEPS, BATCH, INPUTS, STATE, PROJ = 5, 3, 4, 6, 2


def reference_layer(inputs, c, h, weight, bias, projection):
    """The original's LSTMCell with projection, one concat and one matmul per step."""
    outputs = []
    for t in range(inputs.shape[0]):
        gates = tf.matmul(tf.concat([inputs[t], h], axis=1), weight) + bias
        i, j, f, o = tf.split(gates, 4, axis=1)
        c = tf.sigmoid(f + FORGET_BIAS) * c + tf.sigmoid(i) * tf.tanh(j)
        h = tf.matmul(tf.sigmoid(o) * tf.tanh(c), projection)
        outputs.append(h)
    return tf.stack(outputs), c, h


def random_arguments(seed):
    rng = np.random.default_rng(seed)
    shapes = [(STEPS, BATCH, INPUTS), (BATCH, STATE), (BATCH, PROJ), (INPUTS + PROJ, 4 * STATE),
              (4 * STATE,), (STATE, PROJ)]
    return [tf.constant(rng.normal(size=shape)) for shape in shapes]  # float64: a tight comparison


def outputs_and_gradients(layer, arguments, with_final_state_loss):
    with tf.GradientTape() as tape:
        tape.watch(arguments)
        outputs, c, h = layer(*arguments)
        # A loss that weights every output differently, so a gradient in the wrong step shows.
        weights = tf.reshape(tf.cos(tf.cast(tf.range(tf.size(outputs)), outputs.dtype)), outputs.shape)
        loss = tf.reduce_sum(outputs * weights)
        if with_final_state_loss:
            loss += tf.reduce_sum(tf.sin(c)) + tf.reduce_sum(h * h)
    gradients = tape.gradient(loss, arguments)
    return [outputs, c, h], gradients


def test_forward_and_weight_and_input_gradients_match_autodiff():
    arguments = random_arguments(0)
    expected, expected_grads = outputs_and_gradients(reference_layer, arguments, True)
    got, got_grads = outputs_and_gradients(lstmp_layer, arguments, True)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    names = ["inputs", "c", "h", "weight", "bias", "projection"]
    for name, a, b in zip(names, got_grads, expected_grads):
        if name in ("c", "h"):
            # The carried state of truncated BPTT is an input of the window, never trained.
            assert not np.any(a.numpy()), name
            continue
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_gradients_without_a_loss_on_the_final_state():
    arguments = random_arguments(1)
    _, expected_grads = outputs_and_gradients(reference_layer, arguments, False)
    _, got_grads = outputs_and_gradients(lstmp_layer, arguments, False)
    for index in (0, 3, 4, 5):
        np.testing.assert_allclose(got_grads[index].numpy(), expected_grads[index].numpy(), rtol=1e-9, atol=1e-11)


def test_compiled_graph_gives_the_eager_result():
    arguments = [tf.cast(a, tf.float32) for a in random_arguments(2)]
    eager, _ = outputs_and_gradients(lstmp_layer, arguments, False)
    compiled = tf.function(lambda *a: outputs_and_gradients(lstmp_layer, list(a), False))(*arguments)
    np.testing.assert_allclose(compiled[0][0].numpy(), eager[0].numpy(), rtol=1e-5, atol=1e-6)


def test_softmax_pieces_match_autodiff_of_the_textbook_versions():
    rng = np.random.default_rng(3)
    inputs, weights, biases = (tf.constant(rng.normal(size=s)) for s in [(6, 4), (5, 4), (5,)])
    true_logits = tf.constant(rng.normal(size=6))
    scale = tf.constant(rng.normal(size=6))

    def loss_of(logits_fn, cross_entropy_fn):
        with tf.GradientTape() as tape:
            tape.watch([inputs, weights, biases, true_logits])
            losses = cross_entropy_fn(true_logits, logits_fn(inputs, weights, biases))
            loss = tf.reduce_sum(losses * scale)
        return [loss.numpy()] + [g.numpy() for g in tape.gradient(loss, [inputs, weights, biases, true_logits])]

    def textbook_logits(x, w, b):
        return tf.matmul(x, w, transpose_b=True) + b

    def textbook_cross_entropy(true, candidates):
        return tf.reduce_logsumexp(tf.concat([true[:, None], candidates], 1), axis=1) - true

    got = loss_of(ops.candidate_logits, ops.true_first_cross_entropy)
    expected = loss_of(textbook_logits, textbook_cross_entropy)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ops.column_sums(weights).numpy(), weights.numpy().sum(0), rtol=1e-12)


def test_cross_entropy_is_finite_for_huge_logits_and_leaves_out_excluded_candidates():
    true = tf.constant([300.0, -300.0])
    expected = [np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))]
    removed = tf.constant([[299.0, tf.float32.min], [tf.float32.min, -299.0]])
    np.testing.assert_allclose(ops.true_first_cross_entropy(true, removed).numpy(), expected, rtol=2e-5)
    # Accidental hits: each excluded entry is its row's true logit, and adds nothing.
    hits = tf.Variable([[299.0, 300.0], [-300.0, -299.0]])
    excluded = tf.constant([[0, 1], [1, 0]], tf.int64)
    with tf.GradientTape() as tape:
        losses = ops.true_first_cross_entropy(true, hits, excluded)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=2e-5)
    gradient = tape.gradient(losses, hits).numpy()
    assert gradient[0, 1] == gradient[1, 0] == 0.0 and gradient[0, 0] > 0 and gradient[1, 1] > 0
