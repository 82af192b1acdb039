"""Differentiable pieces of the model with hand-written backwards, where autodiff is slow.

What autodiff does badly here, measured on the CPU (README "Speed"):
- a per-step LSTM cell does every weight-gradient matmul once per time step
  with only `batch_size` rows, then adds the 20 results;
- column sums (bias gradients) through TensorFlow's reduction run ~10x slower
  than the same sum as a matrix-vector product;
- the sampled softmax concatenates the true logit to the candidates' and runs
  a generic cross-entropy over a dense one-hot label matrix.
Each function here keeps the math of the textbook version (tests compare them
to autodiff of it) and only changes how it is computed.
"""
import functools

import tensorflow as tf

FORGET_BIAS = 1.0


def _matmul(a, b, dtype, **kwargs):
    """a @ b with both operands in `dtype` (bf16/fp16 under mixed precision), the product fp32."""
    if dtype == tf.float32:
        return tf.matmul(a, b, **kwargs)
    return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **kwargs), tf.float32)


def column_sums(matrix):
    """Sum over rows of a [rows, cols] matrix, as ones[1, rows] @ matrix (a fast matmul)."""
    ones = tf.ones([1, tf.shape(matrix)[0]], matrix.dtype)
    return tf.reshape(tf.matmul(ones, matrix), [-1])


def _or_zeros(gradient, like):
    return tf.zeros_like(like) if gradient is None else gradient


def _rows(values):
    """A list of [batch, n] tensors (one per step) as one [steps * batch, n] matrix."""
    return tf.reshape(tf.stack(values), [-1, values[0].shape[-1]])


def _transposed(matrix):
    """matrix^T as its own tensor: oneDNN multiplies by a stored [k, n] matrix ~1.5x faster than
    by a transposed [n, k] one at these shapes. The Snapshot keeps Grappler from folding the
    transpose back into the matmul."""
    return tf.raw_ops.Snapshot(input=tf.transpose(matrix))


def lstmp_layer(inputs, c, h, weight, bias, projection, compute_dtype=tf.float32):
    """One LSTM-with-projection layer over a whole window.

    inputs [steps, batch, in] (time-major), state c [batch, state] and h [batch, proj]; the
    weight is the original's [in + proj, 4 * state] matrix, gates in the order i, j, f, o.
    Returns outputs [steps, batch, proj] and the state after the last step. Only the recurrent
    matmul and the projection are per step; the input half of the gates is one matmul over all
    steps, and so is every weight gradient in the backward. The incoming state is the carried
    state of truncated BPTT and gets no gradient (zeros). Under mixed precision the matmul
    operands are `compute_dtype`; the gates, the cell state and every gradient stay fp32."""
    return _lstmp_layer(tf.as_dtype(compute_dtype))(inputs, c, h, weight, bias, projection)


def lstmp_step(inputs, c, h, weight, bias, projection):
    """One time step of lstmp_layer's forward in plain fp32 ops, for serving (no custom gradient,
    any number of steps under tf.scan): the new cell state and output."""
    gates = tf.matmul(tf.concat([inputs, h], axis=1), weight) + bias
    i, j, f, o = tf.split(gates, 4, axis=1)
    c = tf.sigmoid(f + FORGET_BIAS) * c + tf.sigmoid(i) * tf.tanh(j)
    return c, tf.matmul(tf.sigmoid(o) * tf.tanh(c), projection)


@functools.lru_cache(maxsize=None)
def _lstmp_layer(dtype):
    """The custom-gradient layer for one compute dtype (custom gradients take only tensors)."""
    matmul = functools.partial(_matmul, dtype=dtype)
    cast = (lambda t: t) if dtype == tf.float32 else (lambda t: tf.cast(t, dtype))

    @tf.custom_gradient
    def layer(inputs, c, h, weight, bias, projection):
        return _lstmp_forward_backward(matmul, cast, inputs, c, h, weight, bias, projection)

    return layer


def _lstmp_forward_backward(matmul, cast, inputs, c, h, weight, bias, projection):
    steps, in_size = inputs.shape[0], inputs.shape[2]
    batch = tf.shape(inputs)[1]
    input_weight, recurrent_weight, projection_ = cast(weight[:in_size]), cast(weight[in_size:]), cast(projection)
    input_gates = tf.reshape(matmul(tf.reshape(inputs, [-1, in_size]), input_weight) + bias, [steps, batch, -1])
    c_prev, h_prev, gate_values, tanh_cells, memories, outputs = [], [], [], [], [], []
    for t in range(steps):
        gates = input_gates[t] + matmul(h, recurrent_weight)
        i, j, f, o = tf.split(gates, 4, axis=1)
        i, j, f, o = tf.sigmoid(i), tf.tanh(j), tf.sigmoid(f + FORGET_BIAS), tf.sigmoid(o)
        c_prev.append(c)
        h_prev.append(h)
        c = f * c + i * j
        tanh_cells.append(tf.tanh(c))
        memory = o * tanh_cells[-1]
        h = matmul(memory, projection_)
        gate_values.append((i, j, f, o))
        memories.append(memory)
        outputs.append(h)

    def backward(d_outputs, d_c_last, d_h_last):
        d_c = _or_zeros(d_c_last, c)
        d_h_next = _or_zeros(d_h_last, h)
        d_gates, d_hs = [None] * steps, [None] * steps
        projection_t, recurrent_t = _transposed(projection_), _transposed(recurrent_weight)
        for t in reversed(range(steps)):
            i, j, f, o = gate_values[t]
            d_h = d_outputs[t] + d_h_next
            d_hs[t] = d_h
            d_memory = matmul(d_h, projection_t)
            tanh_c = tanh_cells[t]
            d_c = d_c + d_memory * o * (1.0 - tf.square(tanh_c))
            d_i = d_c * j * i * (1.0 - i)
            d_j = d_c * i * (1.0 - tf.square(j))
            d_f = d_c * c_prev[t] * f * (1.0 - f)
            d_o = d_memory * tanh_c * o * (1.0 - o)
            d_gates[t] = tf.concat([d_i, d_j, d_f, d_o], axis=1)
            d_c = d_c * f
            d_h_next = matmul(d_gates[t], recurrent_t)
        all_d_gates = _rows(d_gates)
        layer_inputs = tf.concat([tf.reshape(inputs, [-1, in_size]), _rows(h_prev)], axis=1)
        d_weight = matmul(layer_inputs, all_d_gates, transpose_a=True)
        d_projection = matmul(_rows(memories), _rows(d_hs), transpose_a=True)
        d_inputs = tf.reshape(matmul(all_d_gates, _transposed(input_weight)), tf.shape(inputs))
        return (d_inputs, tf.zeros_like(c_prev[0]), tf.zeros_like(h_prev[0]), d_weight,
                column_sums(all_d_gates), d_projection)

    return (tf.stack(outputs), c, h), backward


def candidate_logits(inputs, weights, biases, compute_dtype=tf.float32):
    """inputs [n, dim] @ weights[k, dim]^T + biases[k]: the logits of k shared candidates,
    fp32, from operands in `compute_dtype`."""
    return _candidate_logits(tf.as_dtype(compute_dtype))(inputs, weights, biases)


@functools.lru_cache(maxsize=None)
def _candidate_logits(dtype):
    matmul = functools.partial(_matmul, dtype=dtype)

    @tf.custom_gradient
    def logits_of(inputs, weights, biases):
        logits = matmul(inputs, weights, transpose_b=True) + biases

        def backward(d_logits):
            # The weight gradient as one [dim, n] @ [n, k] matmul, transposed once (faster than
            # the [k, n] @ [n, dim] autodiff would do).
            d_weights = tf.transpose(matmul(inputs, d_logits, transpose_a=True))
            return matmul(d_logits, weights), d_weights, column_sums(d_logits)

        return logits, backward

    return logits_of


def true_first_cross_entropy(true_logits, logits, excluded=None):
    """Per-row cross-entropy of a softmax over [true logit, candidate logits] whose label is the
    true one: logsumexp(all) - true, without building the [n, k + 1] matrix or a one-hot label.
    `excluded` [m, 2] lists (row, column) entries of `logits` left out of the softmax (the
    sampled softmax's accidental hits): a few scattered zeros in place of a dense mask. They
    still take part in the max that shifts each row for stability, so they must not exceed
    the row's other logits by much; a hit's logit is its row's true logit."""
    if excluded is None:
        excluded = tf.zeros([0, 2], tf.int64)
    return _true_first_cross_entropy(true_logits, logits, excluded)


@tf.custom_gradient
def _true_first_cross_entropy(true_logits, logits, excluded):
    top = tf.maximum(tf.reduce_max(logits, axis=1), true_logits)
    candidate_exp = tf.exp(logits - top[:, None])
    candidate_exp = tf.tensor_scatter_nd_update(candidate_exp, excluded,
                                                tf.zeros([tf.shape(excluded)[0]], candidate_exp.dtype))
    true_exp = tf.exp(true_logits - top)
    total = tf.reduce_sum(candidate_exp, axis=1) + true_exp
    losses = tf.math.log(total) + top - true_logits

    def backward(d_losses):
        scale = d_losses / total
        return true_exp * scale - d_losses, candidate_exp * scale[:, None], None

    return losses, backward
