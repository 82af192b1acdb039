"""The hand-written LSTMP backward and sampled cross-entropy, portable and with the CPU kernels,
equal autodiff of their textbook versions."""
import functools
import importlib.util

import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd import console
from lm1b_hvd.hparams import HParams
from lm1b_hvd.model import cpu_kernels, ops
from lm1b_hvd.model.compute_plan import ComputePlan
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.model.ops import FORGET_BIAS
from tests.model_helpers import needs_cpu_kernels

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


def lstmp_layer(inputs, c, h, weight, bias, projection, chunks=2, cell=ops.ComposedCell,
                step_weights=ops.StoredStepWeights):
    """ops.lstmp_layer with reference_layer's arguments and results."""
    output_chunks, state = ops.lstmp_layer(ops.time_chunks(inputs, chunks), ops.LSTMState(c, h),
                                           ops.LayerWeights(weight, bias, projection), cell=cell,
                                           step_weights=step_weights)
    return tf.concat(output_chunks, axis=0), state.c, state.h


STEP_WEIGHTS = {"stored": ops.StoredStepWeights, "transposed": cpu_kernels.TransposedStepWeights}
# A GPU install builds no CPU kernels: there the tests of the portable path run alone.


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


@pytest.mark.parametrize("step_weights", sorted(STEP_WEIGHTS))
def test_forward_and_weight_and_input_gradients_match_autodiff(step_weights):
    arguments = random_arguments(0)
    expected, expected_grads = outputs_and_gradients(reference_layer, arguments, True)
    layer = functools.partial(lstmp_layer, step_weights=STEP_WEIGHTS[step_weights])
    got, got_grads = outputs_and_gradients(layer, arguments, True)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    names = ["inputs", "c", "h", "weight", "bias", "projection"]
    for name, a, b in zip(names, got_grads, expected_grads):
        if name in ("c", "h"):
            # The carried state of truncated BPTT is an input of the window, never trained.
            assert not np.any(a.numpy()), name
            continue
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def reference_cell_layer(inputs, c, h, gates_of_xh, bias, projection):
    """The textbook LSTMP loop with the gate pre-activations of [x, h] given by `gates_of_xh`."""
    outputs = []
    for t in range(inputs.shape[0]):
        i, j, f, o = tf.split(gates_of_xh(inputs[t], h) + bias, 4, axis=1)
        c = tf.sigmoid(f + FORGET_BIAS) * c + tf.sigmoid(i) * tf.tanh(j)
        h = tf.matmul(tf.sigmoid(o) * tf.tanh(c), projection)
        outputs.append(h)
    return tf.stack(outputs), c, h


def reference_factored_layer(inputs, c, h, weight, factor, bias, projection):
    """f-lm's FLSTMCell: gates = ([x, h] @ W1) @ W2, the bias on the second product."""
    return reference_cell_layer(inputs, c, h, lambda x, h_: tf.matmul(tf.matmul(tf.concat([x, h_], 1), weight), factor),
                                bias, projection)


def reference_grouped_layer(inputs, c, h, weight, bias, projection):
    """f-lm's GLSTMCell: group g multiplies [its slice of x, its slice of h] by its own matrix
    into 4 * state / G pre-activations, split into its i, j, f, o; each gate is the groups'
    parts concatenated."""
    groups = weight.shape[0]

    def gates(x, h_):
        parts = [[], [], [], []]
        for g in range(groups):
            x_g = tf.split(x, groups, axis=1)[g]
            h_g = tf.split(h_, groups, axis=1)[g]
            for gate, part in zip(parts, tf.split(tf.matmul(tf.concat([x_g, h_g], 1), weight[g]), 4, axis=1)):
                gate.append(part)
        return tf.concat([tf.concat(gate, axis=1) for gate in parts], axis=1)

    return reference_cell_layer(inputs, c, h, gates, bias, projection)


GROUPS, FACTOR = 2, 3


def factored_and_grouped_arguments(seed, kind):
    """float64 arguments of the F-LSTM (inputs, c, h, W1, W2, bias, projection) or G-LSTM layer
    (inputs, c, h, W [G, ...], bias, projection), with sizes the groups divide."""
    rng = np.random.default_rng(seed)
    inputs, state, proj = 4, 6, 2
    gate_shapes = ([(inputs + proj, FACTOR), (FACTOR, 4 * state)] if kind == "factored"
                   else [(GROUPS, (inputs + proj) // GROUPS, 4 * state // GROUPS)])
    shapes = [(STEPS, BATCH, inputs), (BATCH, state), (BATCH, proj), *gate_shapes, (4 * state,), (state, proj)]
    return [tf.constant(rng.normal(size=shape)) for shape in shapes]


def factored_or_grouped_layer(kind, cell=ops.ComposedCell, step_weights=ops.StoredStepWeights, chunks=2):
    """ops.lstmp_layer with the reference layer's arguments and results."""
    def layer(inputs, c, h, weight, *rest):
        factor, bias, projection = rest if kind == "factored" else (None, *rest)
        output_chunks, state = ops.lstmp_layer(ops.time_chunks(inputs, chunks), ops.LSTMState(c, h),
                                               ops.LayerWeights(weight, bias, projection, factor), cell=cell,
                                               step_weights=step_weights)
        return tf.concat(output_chunks, axis=0), state.c, state.h
    return layer


REFERENCES = {"factored": reference_factored_layer, "grouped": reference_grouped_layer}


@pytest.mark.parametrize("kind", sorted(REFERENCES))
@pytest.mark.parametrize("step_weights", sorted(STEP_WEIGHTS))
def test_f_lstm_and_g_lstm_match_autodiff_of_f_lms_cells(kind, step_weights):
    """F-LSTM (lstm_factor) and G-LSTM (lstm_groups): the forward and every gradient as autodiff
    of f-lm's FLSTMCell and GLSTMCell with a projection, in float64."""
    arguments = factored_and_grouped_arguments(6, kind)
    expected, expected_grads = outputs_and_gradients(REFERENCES[kind], arguments, True)
    layer = factored_or_grouped_layer(kind, step_weights=STEP_WEIGHTS[step_weights])
    got, got_grads = outputs_and_gradients(layer, arguments, True)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    names = ["inputs", "c", "h", *(["weight", "factor"] if kind == "factored" else ["weight"]), "bias", "projection"]
    for name, a, b in zip(names, got_grads, expected_grads):
        if name in ("c", "h"):
            assert not np.any(a.numpy()), name
        else:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11, err_msg=f"{kind}: {name}")


@needs_cpu_kernels
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_f_lstm_and_g_lstm_on_the_cpu_kernels_match_autodiff(kind):
    arguments = factored_and_grouped_arguments(7, kind)
    expected, expected_grads = outputs_and_gradients(REFERENCES[kind], arguments, True)
    layer = factored_or_grouped_layer(kind, cell=cpu_kernels.FusedCell, step_weights=cpu_kernels.TransposedStepWeights)
    got, got_grads = outputs_and_gradients(layer, [tf.cast(a, tf.float32) for a in arguments], True)
    trained = [index for index in range(len(arguments)) if index not in (1, 2)]  # not the carried c and h
    for a, b in zip([*got, *(got_grads[i] for i in trained)], [*expected, *(expected_grads[i] for i in trained)]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-5)


def test_one_group_is_the_original_lstm():
    """G-LSTM with G = 1 is the original cell: the same outputs and gradients."""
    arguments = random_arguments(8)
    grouped = [*arguments[:3], arguments[3][None], *arguments[4:]]
    expected, expected_grads = outputs_and_gradients(lstmp_layer, arguments, True)
    got, got_grads = outputs_and_gradients(factored_or_grouped_layer("grouped"), grouped, True)
    got_grads[3] = got_grads[3][0]
    for a, b in zip([*got, *got_grads], [*expected, *expected_grads]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_the_serving_step_of_f_lstm_and_g_lstm_is_the_layers_forward(kind):
    inputs, c, h, weight, *rest = factored_and_grouped_arguments(9, kind)
    factor, bias, projection = rest if kind == "factored" else (None, *rest)
    expected, expected_c, _ = factored_or_grouped_layer(kind)(inputs, c, h, weight, *rest)
    state, weights = ops.LSTMState(c, h), ops.LayerWeights(weight, bias, projection, factor)
    for t in range(STEPS):
        state = ops.lstmp_step(inputs[t], state, weights)
        np.testing.assert_allclose(state.h.numpy(), expected[t].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.c.numpy(), expected_c.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", [ops.ComposedCell, pytest.param(cpu_kernels.FusedCell, marks=needs_cpu_kernels)])
@pytest.mark.parametrize("time_chunks", [1, 3, STEPS])
def test_any_number_of_time_chunks_gives_the_same_layer(cell, time_chunks):
    """The steps split into chunks of 1-5 (uneven for 3) for overlap: the same outputs and gradients."""
    arguments = [tf.cast(a, tf.float32) for a in random_arguments(4)]
    expected, expected_grads = outputs_and_gradients(functools.partial(lstmp_layer, cell=cell), arguments, True)
    layer = functools.partial(lstmp_layer, chunks=time_chunks, cell=cell)
    got, got_grads = outputs_and_gradients(layer, arguments, True)
    for a, b in zip([*got, *got_grads], [*expected, *expected_grads]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


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


def test_the_serving_step_is_the_layers_forward():
    """lstmp_step, which the SavedModel runs under tf.scan, steps through what the layer computes."""
    inputs, c, h, weight, bias, projection = random_arguments(5)
    expected, expected_c, expected_h = lstmp_layer(inputs, c, h, weight, bias, projection)
    state, weights = ops.LSTMState(c, h), ops.LayerWeights(weight, bias, projection)
    for t in range(STEPS):
        state = ops.lstmp_step(inputs[t], state, weights)
        np.testing.assert_allclose(state.h.numpy(), expected[t].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.c.numpy(), expected_c.numpy(), rtol=1e-10, atol=1e-12)


@needs_cpu_kernels
@pytest.mark.parametrize("with_final_state_loss, step_weights", [(True, "stored"), (False, "stored"),
                                                                 (True, "transposed")])
def test_fused_cell_kernels_match_autodiff(with_final_state_loss, step_weights):
    """The CPU kernels of lm1b_hvd/kernels, fp32 only, against float64 autodiff of the textbook."""
    arguments = random_arguments(3)
    expected, expected_grads = outputs_and_gradients(reference_layer, arguments, with_final_state_loss)
    fused = functools.partial(lstmp_layer, cell=cpu_kernels.FusedCell, step_weights=STEP_WEIGHTS[step_weights])
    got, got_grads = outputs_and_gradients(fused, [tf.cast(a, tf.float32) for a in arguments],
                                           with_final_state_loss)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-5)
    names = ["inputs", "c", "h", "weight", "bias", "projection"]
    for name, a, b in zip(names, got_grads, expected_grads):
        if name in ("c", "h"):  # the carried state, never trained
            assert not np.any(a.numpy()), name
        else:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-5, err_msg=name)


SMALL = HParams(num_layers=1, batch_size=2, num_steps=4, emb_size=4, state_size=6, projected_size=2, num_shards=1,
                num_sampled=8)


def traced_ops(model):
    """The graph of a forward pass and its sampled softmax losses."""
    def losses(x):
        output_chunks, _ = model.run_layers(model.embed(x), model.zero_state(2), training=False)
        return model.sampled_losses(output_chunks, model.softmax_rows(x, tf.constant([1, 2], tf.int64)))
    return tf.function(losses).get_concrete_function(tf.zeros([2, 4], tf.int32)).graph.get_operations()


def plan(kernels, step_weights="stored"):
    fused = "fused" if kernels == "cpu" else "composed"
    return ComputePlan(kernels, fused, fused, step_weights, 2, "fp32")


@needs_cpu_kernels
def test_the_plan_decides_which_kernels_and_layout_the_model_runs():
    def per_step_matmuls_transpose_b(operations):
        # The per-step matmuls have `batch` rows (the time chunks' have 2 steps' worth): [2, proj]
        # x the recurrent weight, [2, state] x the projection.
        return {op.get_attr("transpose_b") for op in operations if op.type == "MatMul" and op.outputs[0].shape[0] == 2}

    kernels = {"LstmpCell", "CandidateSoftmax"}
    cpu = traced_ops(LSTMPLanguageModel(SMALL, 50, plan=plan("cpu")))
    assert kernels <= {op.type for op in cpu} and per_step_matmuls_transpose_b(cpu) == {False}
    transposed = traced_ops(LSTMPLanguageModel(SMALL, 50, plan=plan("cpu", "transposed")))
    assert kernels <= {op.type for op in transposed} and per_step_matmuls_transpose_b(transposed) == {True}
    portable = traced_ops(LSTMPLanguageModel(SMALL, 50, plan=plan("portable")))
    assert not kernels & {op.type for op in portable} and per_step_matmuls_transpose_b(portable) == {False}


@needs_cpu_kernels
def test_fused_cell_rejects_mismatched_shapes_by_name():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"LstmpCell: recurrent gates \[3,20\]"):
        cpu_kernels.FusedCell.forward(tf.zeros([2, 3, 20]), tf.zeros([3, 20]), tf.zeros([3, 6]), 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"LstmpCell: no step 2 .* window \[2,3,24\]"):
        cpu_kernels.FusedCell.forward(tf.zeros([2, 3, 24]), tf.zeros([3, 24]), tf.zeros([3, 6]), 2)


@needs_cpu_kernels
def test_fused_cell_leaves_a_window_the_caller_still_holds_intact():
    """The kernels write their window in place only where nothing else holds it."""
    input_gates = tf.random.stateless_normal([2, 3, 24], [1, 2])
    recurrent_gates, c = tf.random.stateless_normal([3, 24], [3, 4]), tf.random.stateless_normal([3, 6], [5, 6])
    _, _, tanh_c, activations = cpu_kernels.FusedCell.forward(input_gates, recurrent_gates, c, 1)
    _, _, _, expected = ops.ComposedCell.forward(ops.ComposedCell.window(input_gates), recurrent_gates, c, 1)
    np.testing.assert_allclose(activations[1].numpy(), tf.concat(expected[1], axis=1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(activations[0].numpy(), input_gates[0].numpy())
    d_memory = tf.random.stateless_normal([3, 6], [7, 8])
    gradients, d_gates, _ = cpu_kernels.FusedCell.backward(activations, tanh_c, c, tf.zeros_like(c), d_memory, 1)
    _, expected_d_gates, _ = ops.ComposedCell.backward(expected, tanh_c, c, tf.zeros_like(c), d_memory, 1)
    np.testing.assert_allclose(d_gates.numpy(), expected_d_gates.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(gradients[0].numpy(), input_gates[0].numpy())
    # Each op's input is still what it was: the forward's gates, the backward's activations.
    np.testing.assert_array_equal(input_gates.numpy(), tf.random.stateless_normal([2, 3, 24], [1, 2]).numpy())
    np.testing.assert_allclose(activations[1].numpy(), tf.concat(expected[1], axis=1).numpy(), rtol=1e-6, atol=1e-6)


def test_unbuilt_kernels_are_a_one_line_error_naming_the_fix(monkeypatch):
    cpu_kernels.load.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        assert not cpu_kernels.built()
        with pytest.raises(console.UserError, match=r"not built: reinstall .*pip install --no-build-isolation.*"
                                                    r" or train with --hpconfig kernels=portable"):
            cpu_kernels.load()
    finally:
        cpu_kernels.load.cache_clear()


def textbook_sampled_cross_entropy(inputs, weights, biases, true_logits, excluded):
    logits = tf.matmul(inputs, weights, transpose_b=True) + biases
    left_out = tf.equal(tf.range(tf.shape(logits)[1])[None, :], excluded[:, None])
    logits = tf.where(left_out, logits.dtype.min, logits)
    return tf.reduce_logsumexp(tf.concat([true_logits[:, None], logits], 1), axis=1) - true_logits


def losses_and_gradients(cross_entropy, inputs, weights, biases, true_logits, excluded, scale):
    with tf.GradientTape() as tape:
        tape.watch([inputs, weights, biases, true_logits])
        losses = cross_entropy(inputs, weights, biases, true_logits, excluded)
        loss = tf.reduce_sum(losses * scale)
    gradients = tape.gradient(loss, [inputs, weights, biases, true_logits])
    return [losses.numpy()] + [g.numpy() for g in gradients]


EXCLUDED = [[-1] * 6, [2, -1, -1, 4, -1, 0], [0, 0, 3, 3, 1, 4]]


def cross_entropy_arguments(excluded):
    """(inputs, weights, biases, true logits, excluded, scale) in float64: rows with and without
    a left-out candidate (an accidental hit), several rows leaving out the same one."""
    rng = np.random.default_rng(3)
    inputs, weights, biases = (tf.constant(rng.normal(size=s)) for s in [(6, 4), (5, 4), (5,)])
    true_logits, scale = tf.constant(rng.normal(size=6)), tf.constant(rng.normal(size=6))
    return inputs, weights, biases, true_logits, tf.constant(excluded, tf.int32), scale


@pytest.mark.parametrize("excluded", EXCLUDED)
def test_sampled_cross_entropy_matches_autodiff_of_the_textbook_version(excluded):
    arguments = cross_entropy_arguments(excluded)
    got = losses_and_gradients(ops.sampled_cross_entropy, *arguments)
    expected = losses_and_gradients(textbook_sampled_cross_entropy, *arguments)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@needs_cpu_kernels
@pytest.mark.parametrize("excluded", EXCLUDED)
def test_the_candidate_softmax_kernel_matches_autodiff_of_the_textbook_version(excluded):
    """The CPU kernel's softmax, fp32 only, against the float64 textbook."""
    inputs, weights, biases, true_logits, excluded, scale = cross_entropy_arguments(excluded)
    expected = losses_and_gradients(textbook_sampled_cross_entropy, inputs, weights, biases, true_logits, excluded,
                                    scale)
    fused = functools.partial(ops.sampled_cross_entropy, candidate_softmax=cpu_kernels.fused_candidate_softmax)
    got = losses_and_gradients(fused, *(tf.cast(t, tf.float32) for t in (inputs, weights, biases, true_logits)),
                               excluded, tf.cast(scale, tf.float32))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@needs_cpu_kernels
def test_candidate_softmax_kernel_on_wide_rows_and_a_logits_buffer_the_caller_still_holds():
    """Rows wider than a vector, logits of very different scales; the caller's logits stay intact."""
    row_scales = tf.constant([[0.1], [1.0], [10.0], [100.0], [1000.0]])
    logits = tf.random.stateless_normal([5, 1003], [1, 2]) * row_scales
    expected_logits = logits.numpy()
    biases = tf.random.stateless_normal([1003], [3, 4])
    probabilities, log_sum_exp = cpu_kernels.fused_candidate_softmax(logits, biases)
    x = tf.cast(logits + biases, tf.float64)
    np.testing.assert_allclose(probabilities.numpy(), tf.nn.softmax(x).numpy(), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(log_sum_exp.numpy(), tf.reduce_logsumexp(x, axis=1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(logits.numpy(), expected_logits)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"CandidateSoftmax: biases \[4\] for logits \[5,1003\]"):
        cpu_kernels.fused_candidate_softmax(logits, biases[:4])


@pytest.mark.parametrize("candidate_softmax", [
    ops.composed_candidate_softmax, pytest.param(cpu_kernels.fused_candidate_softmax, marks=needs_cpu_kernels)])
def test_sampled_cross_entropy_is_finite_for_huge_logits_and_left_out_hits(candidate_softmax):
    # Row 0's candidate logits are [299, 300], row 1's [-300, -299]; each row leaves out the
    # candidate equal to its true logit (an accidental hit), as the sampled softmax does.
    inputs = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    weights = tf.constant([[299.0, -300.0], [300.0, -299.0]])
    true_logits = tf.constant([300.0, -300.0])
    excluded = tf.constant([1, 0])
    cross_entropy = functools.partial(ops.sampled_cross_entropy, candidate_softmax=candidate_softmax)
    losses, d_inputs, d_weights, d_biases, d_true = losses_and_gradients(
        cross_entropy, inputs, weights, tf.zeros([2]), true_logits, excluded, tf.ones([2]))
    np.testing.assert_allclose(losses, [np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))], rtol=2e-5)
    # Only the kept candidates get gradient: column 0 from row 0, column 1 from row 1.
    np.testing.assert_allclose(d_biases, [1 / (1 + np.e), np.e / (1 + np.e)], rtol=2e-5)
    assert all(np.isfinite(g).all() for g in (d_inputs, d_weights, d_true))
    # A left-out hit that holds all of the candidates' mass: the loss is the true word's alone.
    losses, *gradients = losses_and_gradients(
        cross_entropy, inputs[:1], tf.constant([[300.0, 0.0], [-300.0, 0.0]]), tf.zeros([2]),
        true_logits[:1], tf.constant([0]), tf.ones([1]))
    assert 0.0 <= losses[0] < 1e-6 and all(np.isfinite(g).all() for g in gradients)
