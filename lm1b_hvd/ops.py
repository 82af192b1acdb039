"""Differentiable pieces of the model with hand-written backwards, where autodiff is slow.

What autodiff does badly here, measured on the CPU (README "Speed"):
- a per-step LSTM cell does every weight-gradient matmul once per time step
  with only `batch_size` rows, then adds the 20 results;
- column sums (bias gradients) through TensorFlow's reduction run ~10x slower
  than one more row in a weight gradient's matmul;
- the sampled softmax concatenates the true logit to the candidates', masks
  accidental hits with a dense tokens x candidates matrix and runs a generic
  cross-entropy over a dense one-hot label matrix: four passes over
  [tokens, candidates] where one fused softmax does.
Each function here keeps the math of the textbook version (tests compare them
to autodiff of it) and only changes how it is computed.
"""
import functools
import importlib.util

import tensorflow as tf

from lm1b_hvd import console

FORGET_BIAS = 1.0
TIME_CHUNKS = 2  # 3 is as fast on LSTM-2048-512, 4 slower: one more add of the weight gradient each


def _matmul(a, b, dtype, **kwargs):
    """a @ b with both operands in `dtype` (bf16/fp16 under mixed precision), the product fp32."""
    if dtype == tf.float32:
        return tf.matmul(a, b, **kwargs)
    return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **kwargs), tf.float32)


def with_column(matrix, column=None):
    """[matrix, column] (a column of ones by default): multiplied as (this)^T @ G, the last row
    of the product is G's column sums weighted by `column`, a bias gradient for the price of
    one more row in a weight gradient's matmul (a column sum on its own runs ~10x slower
    through TensorFlow's reduction, and a [1, n] matmul is slow for small n)."""
    if column is None:
        column = tf.ones([tf.shape(matrix)[0]], matrix.dtype)
    return tf.concat([matrix, column[:, None]], axis=1)


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


def lstmp_layer(inputs, c, h, weight, bias, projection, compute_dtype=tf.float32, fused_cell=False,
                transposed_step_weights=False):
    """One LSTM-with-projection layer over a whole window.

    inputs [steps, batch, in] (time-major), state c [batch, state] and h [batch, proj]; the
    weight is the original's [in + proj, 4 * state] matrix, gates in the order i, j, f, o.
    Returns outputs [steps, batch, proj] and the state after the last step. Only the recurrent
    matmul and the projection are per step; the input half of the gates is one matmul over each
    time chunk (time_chunks), and so is every weight gradient in the backward, so that a
    chunk's big matmuls run beside another chunk's per-step ones. The incoming state is the carried
    state of truncated BPTT and gets no gradient (zeros). Under mixed precision the matmul
    operands are `compute_dtype`; the gates, the cell state and every gradient stay fp32.
    `fused_cell`: each step's gate arithmetic is one kernel of lm1b_hvd/kernels (CPU only, not
    under XLA), forward and backward, instead of ~25 TensorFlow ops. `transposed_step_weights`:
    the per-step matmuls take their weights transposed ([n, k], transpose_b), which oneDNN's
    AVX2 kernels multiply by `batch` rows up to 1.9x faster (its AVX-512 ones are faster with
    [k, n]: devices.onednn_avx512)."""
    output_chunks, c, h = lstmp_layer_chunks(time_chunks(inputs), c, h, weight, bias, projection,
                                             compute_dtype, fused_cell, transposed_step_weights)
    return tf.concat(output_chunks, axis=0), c, h


def lstmp_layer_chunks(input_chunks, c, h, weight, bias, projection, compute_dtype=tf.float32, fused_cell=False,
                       transposed_step_weights=False):
    """lstmp_layer with its inputs and outputs in time chunks: a chunk's outputs are there once
    its steps are, so what reads them (the sampled softmax, the next layer) can start on them
    beside the next chunk's steps."""
    layer = _lstmp_layer(tf.as_dtype(compute_dtype), fused_cell, transposed_step_weights)
    *output_chunks, c, h = layer(c, h, weight, bias, projection, *input_chunks)
    return output_chunks, c, h


def time_chunks(values):
    """values [steps, ...] as TIME_CHUNKS consecutive chunks of near-equal numbers of steps."""
    steps = values.shape[0]
    bounds = [steps * k // TIME_CHUNKS for k in range(TIME_CHUNKS + 1)]
    return tf.split(values, [stop - start for start, stop in zip(bounds, bounds[1:]) if stop > start], axis=0)


def lstmp_step(inputs, c, h, weight, bias, projection):
    """One time step of lstmp_layer's forward in plain fp32 ops, for serving (no custom gradient,
    any number of steps under tf.scan): the new cell state and output."""
    gates = tf.matmul(tf.concat([inputs, h], axis=1), weight) + bias
    i, j, f, o = tf.split(gates, 4, axis=1)
    c = tf.sigmoid(f + FORGET_BIAS) * c + tf.sigmoid(i) * tf.tanh(j)
    return c, tf.matmul(tf.sigmoid(o) * tf.tanh(c), projection)


class ComposedCell:
    """A step's gate arithmetic in TensorFlow ops: runs on any device and under XLA.

    Both cells hold the layer's per-step values in a window over one time chunk's steps that
    forward and backward take and return: at first each step's input half of the gates (one
    matmul for the chunk), which the forward replaces with the step's gate activations and the
    backward then with their gradients. After the backward, `window_rows` is the chunk's gate
    gradients as one [steps * batch, 4 * state] matrix, for the weight gradients' matmuls."""

    @staticmethod
    def window(input_gates):
        """The window of input_gates [steps, batch, 4 * state]."""
        return tuple(tf.unstack(input_gates))

    @staticmethod
    def forward(window, recurrent_gates, c_prev, step):
        """(c, memory, tanh(c), window) from the step's recurrent half of the gates and c_prev."""
        i, j, f, o = tf.split(window[step] + recurrent_gates, 4, axis=1)
        i, j, f, o = tf.sigmoid(i), tf.tanh(j), tf.sigmoid(f + FORGET_BIAS), tf.sigmoid(o)
        c = f * c_prev + i * j
        tanh_c = tf.tanh(c)
        return c, o * tanh_c, tanh_c, _replaced(window, step, (i, j, f, o))

    @staticmethod
    def backward(window, tanh_c, c_prev, d_c, d_memory, step):
        """(window, the step's gate gradients [batch, 4 * state], the gradient of c_prev) from
        d_c, the gradient reaching c from later steps, and d_memory. The gate gradients are
        taken before the activations."""
        i, j, f, o = window[step]
        d_c = d_c + d_memory * o * (1.0 - tf.square(tanh_c))
        d_i = d_c * j * i * (1.0 - i)
        d_j = d_c * i * (1.0 - tf.square(j))
        d_f = d_c * c_prev * f * (1.0 - f)
        d_o = d_memory * tanh_c * o * (1.0 - o)
        d_gates = tf.concat([d_i, d_j, d_f, d_o], axis=1)
        return _replaced(window, step, d_gates), d_gates, d_c * f

    @staticmethod
    def window_rows(window):
        return _rows(window)


def _replaced(items, index, item):
    return items[:index] + (item,) + items[index + 1:]


class FusedCell:
    """ComposedCell's math, forward and backward each one CPU kernel (lm1b_hvd/kernels). The
    window is the [steps, batch, 4 * state] tensor itself, which the kernels write in place."""

    @staticmethod
    def window(input_gates):
        return input_gates

    @staticmethod
    def forward(window, recurrent_gates, c_prev, step):
        c, memory, window, tanh_c = _kernels().lstmp_cell(
            window, recurrent_gates, c_prev, forget_bias=FORGET_BIAS, step=step)
        return c, memory, tanh_c, window

    @staticmethod
    def backward(window, tanh_c, c_prev, d_c, d_memory, step):
        window, d_c_prev = _kernels().lstmp_cell_grad(window, tanh_c, c_prev, d_c, d_memory, step=step)
        return window, window[step], d_c_prev

    @staticmethod
    def window_rows(window):
        return tf.reshape(window, [-1, window.shape[-1]])


@functools.lru_cache(maxsize=None)
def _kernels():
    """The op library that setup.py builds from lm1b_hvd/kernels/*.cc."""
    rebuild = "reinstall the package with `pip install --no-build-isolation .` (bash install.sh does)"
    spec = importlib.util.find_spec("lm1b_hvd._kernels")
    if spec is None:
        raise console.UserError(f"lm1b_hvd's CPU kernels are not built: {rebuild}")
    try:
        return tf.load_op_library(spec.origin)
    except tf.errors.NotFoundError as error:  # built against another TensorFlow
        raise console.UserError(f"lm1b_hvd's CPU kernels do not load into this TensorFlow: {error}; "
                                f"{rebuild}") from None


@functools.lru_cache(maxsize=None)
def _lstmp_layer(dtype, fused_cell, transposed_step_weights):
    """The custom-gradient layer for one compute dtype, cell and form of the per-step weights
    (custom gradients take only tensors)."""
    matmul = functools.partial(_matmul, dtype=dtype)
    cast = (lambda t: t) if dtype == tf.float32 else (lambda t: tf.cast(t, dtype))
    cell = FusedCell if fused_cell else ComposedCell

    @tf.custom_gradient
    def layer(c, h, weight, bias, projection, *input_chunks):
        return _lstmp_forward_backward(cell, matmul, transposed_step_weights, cast, input_chunks, c, h, weight, bias,
                                       projection)

    return layer


def _lstmp_forward_backward(cell, matmul, transposed_step_weights, cast, input_chunks, c, h, weight, bias,
                            projection):
    in_size = input_chunks[0].shape[2]
    batch = tf.shape(input_chunks[0])[1]
    input_weight, recurrent_weight, projection_ = cast(weight[:in_size]), cast(weight[in_size:]), cast(projection)
    # The per-step matmuls' weights: as they are, or transposed for step_matmul's transpose_b.
    step_matmul = functools.partial(matmul, transpose_b=transposed_step_weights)
    if transposed_step_weights:
        recurrent_step, projection_step = _transposed(recurrent_weight), _transposed(projection_)
    else:
        recurrent_step, projection_step = recurrent_weight, projection_
    chunks, start = [], 0  # each chunk's range of steps
    for chunk_inputs in input_chunks:
        chunks.append(range(start, start + chunk_inputs.shape[0]))
        start += chunk_inputs.shape[0]
    steps = start
    chunk_rows = [tf.reshape(chunk_inputs, [-1, in_size]) for chunk_inputs in input_chunks]
    # A window per chunk: the recurrence starts once the first chunk's input gates are there,
    # and the later chunks' matmuls run beside its per-step matmuls.
    windows = [cell.window(tf.reshape(matmul(rows, input_weight) + bias, [len(chunk), batch, -1]))
               for rows, chunk in zip(chunk_rows, chunks)]
    c_prev, h_prev, tanh_cs, memories, outputs = [], [], [], [], []
    for k, chunk in enumerate(chunks):
        for t in chunk:
            c_prev.append(c)
            h_prev.append(h)
            c, memory, tanh_c, windows[k] = cell.forward(windows[k], step_matmul(h, recurrent_step), c,
                                                         t - chunk.start)
            h = step_matmul(memory, projection_step)
            tanh_cs.append(tanh_c)
            memories.append(memory)
            outputs.append(h)

    def backward(*d_output_chunks_and_state):
        *d_output_chunks, d_c_last, d_h_last = d_output_chunks_and_state
        # TensorFlow runs an op as soon as its inputs are ready: without these control
        # dependencies the parts that need only forward values (weight transposes, gate
        # derivatives, stacked inputs) would run during the forward and sit in memory through
        # the step's peak, the sampled softmax.
        with tf.control_dependencies([d_output_chunks[-1]]):
            d_c = _or_zeros(d_c_last, c)
            d_h_next = _or_zeros(d_h_last, h)
            input_weight_t = _transposed(input_weight)
            if transposed_step_weights:
                projection_back, recurrent_back = projection_, recurrent_weight
            else:
                projection_back, recurrent_back = _transposed(projection_), _transposed(recurrent_weight)
        d_hs, d_input_chunks, d_weight_and_bias = [None] * steps, [None] * len(chunks), None
        for k in reversed(range(len(chunks))):
            chunk = chunks[k]
            d_outputs = tf.unstack(_or_zeros(d_output_chunks[k], output_chunks[k]))
            for t in reversed(chunk):
                d_h = d_outputs[t - chunk.start] + d_h_next
                d_hs[t] = d_h
                with tf.control_dependencies([d_h]):  # step t's derivatives once step t is reached
                    windows[k], d_gates, d_c = cell.backward(windows[k], tanh_cs[t], c_prev[t], d_c,
                                                             step_matmul(d_h, projection_back), t - chunk.start)
                if t > 0:  # the incoming state gets no gradient
                    d_h_next = step_matmul(d_gates, recurrent_back)
            # The chunk's weight gradients once its gate gradients are all there: beside the
            # earlier chunks' per-step matmuls.
            chunk_d_gates = cell.window_rows(windows[k])
            with tf.control_dependencies([chunk_d_gates]):
                layer_inputs = with_column(tf.concat([chunk_rows[k], _rows(h_prev[chunk.start:chunk.stop])], axis=1))
                chunk_d_weight_and_bias = matmul(layer_inputs, chunk_d_gates, transpose_a=True)
                d_input_chunks[k] = tf.reshape(matmul(chunk_d_gates, input_weight_t), tf.shape(input_chunks[k]))
            d_weight_and_bias = (chunk_d_weight_and_bias if d_weight_and_bias is None
                                 else d_weight_and_bias + chunk_d_weight_and_bias)
        # Its transpose [proj, state] then a 4 MB transpose: oneDNN's transposed-A product
        # runs ~10-25% faster with the wide matrix as the output's columns.
        d_projection = tf.transpose(matmul(_rows(d_hs), _rows(memories), transpose_a=True))
        return (tf.zeros_like(c_prev[0]), tf.zeros_like(h_prev[0]), d_weight_and_bias[:-1], d_weight_and_bias[-1],
                d_projection, *d_input_chunks)

    output_chunks = [tf.stack(outputs[chunk.start:chunk.stop]) for chunk in chunks]
    return (*output_chunks, c, h), backward


def sampled_cross_entropy(inputs, weights, biases, true_logits, excluded, compute_dtype=tf.float32,
                          fused_softmax=False):
    """Per-row cross-entropy of a softmax over [true logit, k shared candidates' logits] whose
    label is the true one: the candidates' logits are inputs [n, dim] @ weights [k, dim]^T +
    biases [k], and `excluded` [n] int32 names the candidate left out of each row's softmax, or
    is -1 (the sampled softmax's accidental hits). Matmul operands in `compute_dtype`, the rest
    fp32.

    tf.nn.sampled_softmax_loss's math without its [n, k + 1] concat, one-hot labels and dense
    hit mask: the candidates' softmax is one pass over them, the true logit and the left-out
    candidates join through each row's log-sum-exp, and the backward never forms the logits'
    gradient: it multiplies the probabilities by rows scaled beforehand and subtracts the
    left-out entries' terms from the results. `fused_softmax`: the candidates' softmax and
    log-sum-exp are one kernel of lm1b_hvd/kernels (CPU only, not under XLA)."""
    return _sampled_cross_entropy(tf.as_dtype(compute_dtype), fused_softmax)(
        inputs, weights, biases, true_logits, excluded)


def composed_candidate_softmax(logits, biases):
    """(softmax, log-sum-exp) of each row of logits + biases, in TensorFlow ops. The log-sum-exp
    is read off the row's most probable candidate (its probability is at least 1/k, so its log
    is exact). Its logit is read first, so that the softmax, then the logits' last reader,
    computes in their buffer (80 MB less at the step's memory peak for the default model)."""
    logits = logits + biases
    best = tf.stack([tf.range(tf.shape(logits)[0]), tf.argmax(logits, axis=1, output_type=tf.int32)], 1)
    best_logits = tf.gather_nd(logits, best)
    with tf.control_dependencies([best_logits]):
        probabilities = tf.nn.softmax(logits)
    return probabilities, best_logits - tf.math.log(tf.gather_nd(probabilities, best))


def fused_candidate_softmax(logits, biases):
    """composed_candidate_softmax as one kernel: one pass over the logits out of cache, in
    their buffer, where the composed ops make three."""
    return _kernels().candidate_softmax(logits, biases)


@functools.lru_cache(maxsize=None)
def _sampled_cross_entropy(dtype, fused_softmax):
    matmul = functools.partial(_matmul, dtype=dtype)
    candidate_softmax = fused_candidate_softmax if fused_softmax else composed_candidate_softmax

    @tf.custom_gradient
    def cross_entropy(inputs, weights, biases, true_logits, excluded):
        # Over the candidates alone; the true logit joins through the log-sum-exp.
        probabilities, candidates_lse = candidate_softmax(matmul(inputs, weights, transpose_b=True), biases)
        # Rows without a left-out candidate read column 0 and count it as nothing.
        columns = tf.maximum(excluded, 0)
        excluded_probabilities = tf.where(excluded >= 0, tf.gather(probabilities, columns, batch_dims=1), 0.0)
        # What is left of the candidates' mass, which the true logit then joins. A left-out hit's
        # logit is its row's true logit, so when it holds nearly all the mass the rounding left
        # in 1 - mass is negligible next to the true word's own term.
        kept_lse = candidates_lse + tf.math.log1p(-excluded_probabilities)
        losses = tf.nn.softplus(kept_lse - true_logits)

        def backward(d_losses):
            # d loss / d candidate logit = p * exp(candidates_lse - log Z), log Z = true + loss.
            row_scale = d_losses * tf.exp(candidates_lse - true_logits - losses)
            excluded_terms = excluded_probabilities * row_scale
            d_inputs = (matmul(probabilities, weights) * row_scale[:, None]
                        - excluded_terms[:, None] * tf.gather(weights, columns))
            # [dim + 1, k]: the weights' gradient transposed, then the biases' in the last row.
            # After d_inputs, which the LSTM's backward waits for: so it runs beside that backward's
            # per-step matmuls, which leave the cores idle part of the time, not beside d_inputs.
            with tf.control_dependencies([d_inputs]):
                scaled = with_column(inputs * row_scale[:, None], row_scale)
                d_weights_and_biases = matmul(scaled, probabilities, transpose_a=True)
            d_weights = tf.tensor_scatter_nd_sub(tf.transpose(d_weights_and_biases[:-1]), columns[:, None],
                                                 excluded_terms[:, None] * inputs)
            d_biases = tf.tensor_scatter_nd_sub(d_weights_and_biases[-1], columns[:, None], excluded_terms)
            d_true_logits = -d_losses * tf.sigmoid(kept_lse - true_logits)
            return d_inputs, d_weights, d_biases, d_true_logits, None

        return losses, backward

    return cross_entropy
