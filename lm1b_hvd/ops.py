"""The model's differentiable pieces with hand-written backwards, in TensorFlow ops that run on
any device and under XLA: what a GPU runs, and the CPU with `kernels=portable`.

Autodiff of the textbook versions is slow in three ways, which these avoid:
- a per-step LSTM cell does every weight-gradient matmul once per time step with only
  `batch_size` rows, then adds the results: here each weight gradient is one matmul over a
  whole time chunk;
- a column sum (a bias gradient) through TensorFlow's reduction is far slower than one more
  row in a weight gradient's matmul: here bias gradients ride along as that row;
- the sampled softmax concatenates the true logit to the candidates', masks accidental hits
  with a dense tokens x candidates matrix and runs a generic cross-entropy over a dense
  one-hot label matrix: four passes over [tokens, candidates] where one softmax does.
Each keeps the math of the textbook version (tests/test_ops.py compares them with autodiff of
it) and changes only how it is computed. The CPU's faster variants of the cell, the softmax and
the per-step weights' layout are in cpu_kernels.py; compute_plan.py chooses between them.
"""
import functools
import typing

import tensorflow as tf

FORGET_BIAS = 1.0


class LSTMState(typing.NamedTuple):
    """One layer's state between windows: the cell state [batch, state] and output [batch, proj]."""
    c: tf.Tensor
    h: tf.Tensor


class LayerWeights(typing.NamedTuple):
    """One LSTMP layer's weights: the original's [in + proj, 4 * state] gate matrix (gates in
    the order i, j, f, o), its bias [4 * state] and the projection [state, proj]."""
    weight: tf.Tensor
    bias: tf.Tensor
    projection: tf.Tensor


def cell_update(gates, c_prev):
    """The LSTM cell's arithmetic from a step's gate pre-activations [batch, 4 * state]:
    (activations (i, j, f, o), c, tanh(c), memory = o * tanh(c)). The one definition of the
    cell: ComposedCell's forward and the serving step call it, and the CPU kernel
    (kernels/lstmp_cell.cc) is tested against it."""
    i, j, f, o = tf.split(gates, 4, axis=1)
    i, j, f, o = tf.sigmoid(i), tf.tanh(j), tf.sigmoid(f + FORGET_BIAS), tf.sigmoid(o)
    c = f * c_prev + i * j
    tanh_c = tf.tanh(c)
    return (i, j, f, o), c, tanh_c, o * tanh_c


def lstmp_step(inputs, state, weights):
    """One time step of an LSTMP layer, forward only, fp32: the new LSTMState. For serving, where
    a tf.scan runs any number of steps (the training layer below unrolls a fixed window)."""
    gates = tf.matmul(tf.concat([inputs, state.h], axis=1), weights.weight) + weights.bias
    _, c, _, memory = cell_update(gates, state.c)
    return LSTMState(c, tf.matmul(memory, weights.projection))


def with_column(matrix, column=None):
    """[matrix, column] (a column of ones by default): multiplied as (this)^T @ G, the last row
    of the product is G's column sums weighted by `column`: a bias gradient for the price of one
    more row in a weight gradient's matmul (a column sum on its own goes through TensorFlow's
    slow reduction, and a [1, n] matmul is slow for small n)."""
    if column is None:
        column = tf.ones([tf.shape(matrix)[0]], matrix.dtype)
    return tf.concat([matrix, column[:, None]], axis=1)


def transposed(matrix):
    """matrix^T as a tensor of its own: oneDNN multiplies by a stored matrix faster than by a
    transposed view of one. The Snapshot keeps Grappler from folding the transpose back into
    the matmul."""
    return tf.raw_ops.Snapshot(input=tf.transpose(matrix))


def time_chunks(values, count):
    """values [steps, ...] as `count` consecutive chunks of near-equal numbers of steps (fewer
    when there are fewer steps)."""
    steps = values.shape[0]
    bounds = [steps * k // count for k in range(count + 1)]
    return tf.split(values, [stop - start for start, stop in zip(bounds, bounds[1:]) if stop > start], axis=0)


def _or_zeros(gradient, like):
    return tf.zeros_like(like) if gradient is None else gradient


def _rows(values):
    """A list of [batch, n] tensors (one per step) as one [steps * batch, n] matrix."""
    return tf.reshape(tf.stack(values), [-1, values[0].shape[-1]])


def _replaced(items, index, item):
    return items[:index] + (item,) + items[index + 1:]


class ComposedCell:
    """A step's gate arithmetic in TensorFlow ops (cell_update): runs on any device and under XLA.

    A cell holds the layer's per-step values in a window over one time chunk's steps, which
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
        activations, c, tanh_c, memory = cell_update(window[step] + recurrent_gates, c_prev)
        return c, memory, tanh_c, _replaced(window, step, activations)

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


class StoredStepWeights:
    """The per-step matmuls (recurrent gates, projection) multiply by each weight as stored,
    [k, n]; their backward by its transpose, made once per window. What a GPU runs."""
    transpose_b = False

    @staticmethod
    def forward(weight):
        return weight

    @staticmethod
    def backward(weight):
        return transposed(weight)


class _Compute(typing.NamedTuple):
    """How a custom-gradient function here computes: the dtype of the matmul operands (bf16/fp16
    under mixed precision; everything else stays fp32) and, for the layer, which cell and which
    layout of the per-step weights."""
    dtype: tf.DType
    cell: type = None
    step_weights: type = None

    def cast(self, tensor):
        return tensor if self.dtype == tf.float32 else tf.cast(tensor, self.dtype)

    def matmul(self, a, b, **kwargs):
        """a @ b with both operands in the plan's dtype, the product fp32."""
        if self.dtype == tf.float32:
            return tf.matmul(a, b, **kwargs)
        return tf.cast(tf.matmul(self.cast(a), self.cast(b), **kwargs), tf.float32)

    def step_matmul(self, a, operand):
        """A per-step matmul by an operand that step_weights.forward or .backward made."""
        return self.matmul(a, operand, transpose_b=self.step_weights.transpose_b)


def lstmp_layer(input_chunks, state, weights, *, cell=ComposedCell, step_weights=StoredStepWeights,
                compute_dtype=tf.float32):
    """One LSTM-with-projection layer over a window given in time chunks.

    input_chunks: [steps_k, batch, in] tensors, time-major, consecutive; state: the LSTMState
    before the window (the carried state of truncated BPTT: it gets no gradient); weights:
    LayerWeights. Returns (output chunks [steps_k, batch, proj], the LSTMState after the last
    step). A chunk's outputs are there once its steps are, so what reads them (the sampled
    softmax, the next layer) can start on them beside the next chunk's steps.

    Only the recurrent matmul and the projection run per step; the input half of the gates is
    one matmul per chunk, and so is every weight gradient in the backward, so that one chunk's
    big matmuls run beside another chunk's per-step ones. `cell` and `step_weights` choose how
    the step's arithmetic and the per-step weights are computed (ComposedCell and
    StoredStepWeights here, or cpu_kernels' FusedCell and TransposedStepWeights on the CPU):
    the results are the same."""
    layer = _custom_gradient_layer(_Compute(tf.as_dtype(compute_dtype), cell, step_weights))
    *output_chunks, c, h = layer(state.c, state.h, *weights, *input_chunks)
    return output_chunks, LSTMState(c, h)


@functools.lru_cache(maxsize=None)
def _custom_gradient_layer(plan):
    """The custom-gradient layer of one _Compute (a custom gradient's arguments are tensors only)."""

    @tf.custom_gradient
    def layer(c, h, weight, bias, projection, *input_chunks):
        return _forward_and_backward(plan, input_chunks, LSTMState(c, h), LayerWeights(weight, bias, projection))

    return layer


def _forward_and_backward(plan, input_chunks, state, weights):
    in_size = input_chunks[0].shape[2]
    batch = tf.shape(input_chunks[0])[1]
    input_weight = plan.cast(weights.weight[:in_size])
    recurrent_weight = plan.cast(weights.weight[in_size:])
    projection = plan.cast(weights.projection)
    recurrent_forward = plan.step_weights.forward(recurrent_weight)
    projection_forward = plan.step_weights.forward(projection)
    chunks, start = [], 0  # each chunk's range of steps
    for chunk_inputs in input_chunks:
        chunks.append(range(start, start + chunk_inputs.shape[0]))
        start += chunk_inputs.shape[0]
    steps = start
    chunk_rows = [tf.reshape(chunk_inputs, [-1, in_size]) for chunk_inputs in input_chunks]
    # A window per chunk: the recurrence starts once the first chunk's input gates are there,
    # and the later chunks' matmuls run beside its per-step matmuls.
    windows = [plan.cell.window(tf.reshape(plan.matmul(rows, input_weight) + weights.bias, [len(chunk), batch, -1]))
               for rows, chunk in zip(chunk_rows, chunks)]
    c, h = state
    c_prev, h_prev, tanh_cs, memories, outputs = [], [], [], [], []
    for k, chunk in enumerate(chunks):
        for t in chunk:
            c_prev.append(c)
            h_prev.append(h)
            c, memory, tanh_c, windows[k] = plan.cell.forward(
                windows[k], plan.step_matmul(h, recurrent_forward), c, t - chunk.start)
            h = plan.step_matmul(memory, projection_forward)
            tanh_cs.append(tanh_c)
            memories.append(memory)
            outputs.append(h)
    output_chunks = [tf.stack(outputs[chunk.start:chunk.stop]) for chunk in chunks]

    def backward(*d_output_chunks_and_state):
        *d_output_chunks, d_c_last, d_h_last = d_output_chunks_and_state
        # TensorFlow runs an op as soon as its inputs are ready: without these control
        # dependencies the parts that need only forward values (weight transposes, stacked
        # inputs) would run during the forward and sit in memory through the step's peak, the
        # sampled softmax.
        with tf.control_dependencies([d_output_chunks[-1]]):
            d_c = _or_zeros(d_c_last, c)
            d_h_next = _or_zeros(d_h_last, h)
            input_weight_t = transposed(input_weight)
            projection_backward = plan.step_weights.backward(projection)
            recurrent_backward = plan.step_weights.backward(recurrent_weight)
        d_hs, d_input_chunks, d_weight_and_bias = [None] * steps, [None] * len(chunks), None
        for k in reversed(range(len(chunks))):
            chunk = chunks[k]
            d_outputs = tf.unstack(_or_zeros(d_output_chunks[k], output_chunks[k]))
            for t in reversed(chunk):
                d_h = d_outputs[t - chunk.start] + d_h_next
                d_hs[t] = d_h
                with tf.control_dependencies([d_h]):  # step t's derivatives once step t is reached
                    windows[k], d_gates, d_c = plan.cell.backward(
                        windows[k], tanh_cs[t], c_prev[t], d_c, plan.step_matmul(d_h, projection_backward),
                        t - chunk.start)
                if t > 0:  # the incoming state gets no gradient
                    d_h_next = plan.step_matmul(d_gates, recurrent_backward)
            # The chunk's weight gradients once its gate gradients are all there: beside the
            # earlier chunks' per-step matmuls.
            chunk_d_gates = plan.cell.window_rows(windows[k])
            with tf.control_dependencies([chunk_d_gates]):
                layer_inputs = with_column(tf.concat([chunk_rows[k], _rows(h_prev[chunk.start:chunk.stop])], axis=1))
                chunk_d_weight_and_bias = plan.matmul(layer_inputs, chunk_d_gates, transpose_a=True)
                d_input_chunks[k] = tf.reshape(plan.matmul(chunk_d_gates, input_weight_t), tf.shape(input_chunks[k]))
            d_weight_and_bias = (chunk_d_weight_and_bias if d_weight_and_bias is None
                                 else d_weight_and_bias + chunk_d_weight_and_bias)
        # Computed as its transpose [proj, state], then transposed: oneDNN's transposed-A
        # product is faster with the wide matrix as the output's columns.
        d_projection = tf.transpose(plan.matmul(_rows(d_hs), _rows(memories), transpose_a=True))
        return (tf.zeros_like(c_prev[0]), tf.zeros_like(h_prev[0]), d_weight_and_bias[:-1], d_weight_and_bias[-1],
                d_projection, *d_input_chunks)

    return (*output_chunks, c, h), backward


def composed_candidate_softmax(logits, biases):
    """(softmax, log-sum-exp) of each row of logits + biases, in TensorFlow ops. The log-sum-exp
    is read off the row's most probable candidate (its probability is at least 1/k, so its log
    is exact). Its logit is read first, so that the softmax, then the logits' last reader,
    computes in their buffer: one [tokens, candidates] matrix less at the step's memory peak."""
    logits = logits + biases
    best = tf.stack([tf.range(tf.shape(logits)[0]), tf.argmax(logits, axis=1, output_type=tf.int32)], 1)
    best_logits = tf.gather_nd(logits, best)
    with tf.control_dependencies([best_logits]):
        probabilities = tf.nn.softmax(logits)
    return probabilities, best_logits - tf.math.log(tf.gather_nd(probabilities, best))


def sampled_cross_entropy(inputs, weights, biases, true_logits, excluded, *,
                          candidate_softmax=composed_candidate_softmax, compute_dtype=tf.float32):
    """Per-row cross-entropy of a softmax over [true logit, k shared candidates' logits] whose
    label is the true one: the candidates' logits are inputs [n, dim] @ weights [k, dim]^T +
    biases [k], and `excluded` [n] int32 names the candidate left out of each row's softmax, or
    is -1 (the sampled softmax's accidental hits). Matmul operands in `compute_dtype`, the rest
    fp32. `candidate_softmax(logits, biases)` -> (probabilities, log-sum-exp):
    composed_candidate_softmax, or the CPU kernel of cpu_kernels.

    tf.nn.sampled_softmax_loss's math without its [n, k + 1] concat, one-hot labels and dense
    hit mask: the candidates' softmax is one pass over them, the true logit and the left-out
    candidates join through each row's log-sum-exp, and the backward never forms the logits'
    gradient: it multiplies the probabilities by rows scaled beforehand and subtracts the
    left-out entries' terms from the results."""
    return _sampled_cross_entropy(candidate_softmax, tf.as_dtype(compute_dtype))(
        inputs, weights, biases, true_logits, excluded)


@functools.lru_cache(maxsize=None)
def _sampled_cross_entropy(candidate_softmax, dtype):
    plan = _Compute(dtype)

    @tf.custom_gradient
    def cross_entropy(inputs, weights, biases, true_logits, excluded):
        # Over the candidates alone; the true logit joins through the log-sum-exp.
        probabilities, candidates_lse = candidate_softmax(plan.matmul(inputs, weights, transpose_b=True), biases)
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
            d_inputs = (plan.matmul(probabilities, weights) * row_scale[:, None]
                        - excluded_terms[:, None] * tf.gather(weights, columns))
            # [dim + 1, k]: the weights' gradient transposed, then the biases' in the last row.
            # After d_inputs, which the LSTM's backward waits for: so it runs beside that
            # backward's per-step matmuls, which leave the cores idle part of the time.
            with tf.control_dependencies([d_inputs]):
                scaled = with_column(inputs * row_scale[:, None], row_scale)
                d_weights_and_biases = plan.matmul(scaled, probabilities, transpose_a=True)
            d_weights = tf.tensor_scatter_nd_sub(tf.transpose(d_weights_and_biases[:-1]), columns[:, None],
                                                 excluded_terms[:, None] * inputs)
            d_biases = tf.tensor_scatter_nd_sub(d_weights_and_biases[-1], columns[:, None], excluded_terms)
            d_true_logits = -d_losses * tf.sigmoid(kept_lse - true_logits)
            return d_inputs, d_weights, d_biases, d_true_logits, None

        return losses, backward

    return cross_entropy
