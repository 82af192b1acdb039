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
    """One LSTMP layer's weights: the gate matrix, its bias [4 * state] (gates in the order i, j,
    f, o) and the projection [state, proj]. The gate matrix's shape says which LSTM it is (the
    Gates classes below): the original's [in + proj, 4 * state]; F-LSTM's [in + proj, factor]
    with `factor` [factor, 4 * state]; G-LSTM's [groups, (in + proj) / groups, 4 * state / groups]."""
    weight: tf.Tensor
    bias: tf.Tensor
    projection: tf.Tensor
    factor: tf.Tensor = None


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
    gates = gates_of(weights)(_Compute(tf.float32, step_weights=StoredStepWeights), weights, inputs.shape[-1])
    gates.prepare_forward()
    _, c, _, memory = cell_update(gates.input_gates(inputs) + gates.recurrent_gates(state.h) + weights.bias, state.c)
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
    """matrix^T (of each matrix of a batch of them) as a tensor of its own: oneDNN multiplies by
    a stored matrix faster than by a transposed view of one. The Snapshot keeps Grappler from
    folding the transpose back into the matmul."""
    return tf.raw_ops.Snapshot(input=tf.linalg.matrix_transpose(matrix))


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
    gates: type = None

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


def gate_rows_axis(weight):
    """The axis of a gate matrix's rows: 0, or 1 for G-LSTM's [groups, rows, columns]."""
    return 1 if weight.shape.rank == 3 else 0


def split_gate_rows(weight, in_size):
    """(the rows the layer's inputs multiply, the recurrent rows h multiplies) of a gate matrix
    (LayerWeights.weight, or F-LSTM's first factor); of each group's rows for G-LSTM."""
    axis = gate_rows_axis(weight)
    given = in_size // weight.shape[0] if axis else in_size
    return tf.split(weight, [given, weight.shape[axis] - given], axis=axis)


class FullGates:
    """The original LSTM's gate matrix: gates = [x, h] @ W, W [in + proj, 4 * state]. Built on a
    layer's LayerWeights for one _Compute: the input half multiplies a time chunk's rows at once,
    the recurrent half one step's `h` (its operands laid out once per window by the plan's
    step_weights, `prepare_forward` and `prepare_backward`)."""

    def __init__(self, plan, weights, in_size):
        self.plan = plan
        given, recurrent = split_gate_rows(weights.weight, in_size)
        self.input_weight, self.recurrent_weight = plan.cast(given), plan.cast(recurrent)

    def prepare_forward(self):
        self.recurrent_forward = self.plan.step_weights.forward(self.recurrent_weight)

    def prepare_backward(self):
        self.recurrent_backward = self.plan.step_weights.backward(self.recurrent_weight)
        self.input_weight_t = transposed(self.input_weight)

    def input_gates(self, rows):
        """The input half of the gates of rows [n, in]: [n, 4 * state]."""
        return self.plan.matmul(rows, self.input_weight)

    def recurrent_gates(self, h):
        """The recurrent half of a step's gates, h [batch, proj] -> [batch, 4 * state]."""
        return self.plan.step_matmul(h, self.recurrent_forward)

    def d_recurrent(self, d_gates):
        """The gradient of h_prev from a step's gate gradients."""
        return self.plan.step_matmul(d_gates, self.recurrent_backward)

    def chunk_gradients(self, input_rows, h_prev_rows, d_gates):
        """(d input rows, the gate matrix's and the bias's gradients as weight_gradients takes
        them, summed over chunks) of a time chunk, from its rows [n, in], the h before each step
        [n, proj] and its gate gradients [n, 4 * state]."""
        layer_inputs = with_column(tf.concat([input_rows, h_prev_rows], axis=1))
        d_weight_and_bias = self.plan.matmul(layer_inputs, d_gates, transpose_a=True)
        return self.plan.matmul(d_gates, self.input_weight_t), (d_weight_and_bias,)

    @staticmethod
    def weight_gradients(summed):
        """(gradients of the gate matrix's tensors, a tuple; the bias's) from the chunks' sums."""
        (d_weight_and_bias,) = summed
        return (d_weight_and_bias[:-1],), d_weight_and_bias[-1]


class FactoredGates:
    """F-LSTM (Kuchaiev and Ginsburg 2017): the gate matrix factored through an inner size R,
    gates = ([x, h] @ W1) @ W2, W1 [in + proj, R] (LayerWeights.weight), W2 [R, 4 * state]
    (LayerWeights.factor): (in + proj + 4 * state) * R multiply-adds a row instead of
    (in + proj) * 4 * state. Every product goes through the inner size; W1 @ W2 is never formed."""

    def __init__(self, plan, weights, in_size):
        self.plan = plan
        self.weight = plan.cast(weights.weight)
        self.input_weight, self.recurrent_weight = split_gate_rows(self.weight, in_size)
        self.factor = plan.cast(weights.factor)

    def prepare_forward(self):
        forward = self.plan.step_weights.forward
        self.recurrent_forward, self.factor_forward = forward(self.recurrent_weight), forward(self.factor)

    def prepare_backward(self):
        backward = self.plan.step_weights.backward
        self.recurrent_backward, self.factor_backward = backward(self.recurrent_weight), backward(self.factor)
        self.input_weight_t, self.factor_t = transposed(self.input_weight), transposed(self.factor)

    def input_gates(self, rows):
        return self.plan.matmul(self.plan.matmul(rows, self.input_weight), self.factor)

    def recurrent_gates(self, h):
        return self.plan.step_matmul(self.plan.step_matmul(h, self.recurrent_forward), self.factor_forward)

    def d_recurrent(self, d_gates):
        return self.plan.step_matmul(self.plan.step_matmul(d_gates, self.factor_backward), self.recurrent_backward)

    def chunk_gradients(self, input_rows, h_prev_rows, d_gates):
        plan = self.plan
        layer_inputs = tf.concat([input_rows, h_prev_rows], axis=1)
        inner = plan.matmul(layer_inputs, self.weight)  # [x, h] @ W1, recomputed rather than kept
        d_factor_and_bias = plan.matmul(with_column(inner), d_gates, transpose_a=True)
        d_inner = plan.matmul(d_gates, self.factor_t)
        d_weight = plan.matmul(layer_inputs, d_inner, transpose_a=True)
        return plan.matmul(d_inner, self.input_weight_t), (d_weight, d_factor_and_bias)

    @staticmethod
    def weight_gradients(summed):
        d_weight, d_factor_and_bias = summed
        return (d_weight, d_factor_and_bias[:-1]), d_factor_and_bias[-1]


def to_groups(rows, groups):
    """[n, groups * k] -> [groups, n, k]: group g's consecutive features."""
    return tf.transpose(tf.reshape(rows, [tf.shape(rows)[0], groups, -1]), [1, 0, 2])


def from_groups(grouped):
    """[groups, n, k] -> [n, groups * k]: to_groups undone."""
    return tf.reshape(tf.transpose(grouped, [1, 0, 2]), [tf.shape(grouped)[1], -1])


def gates_from_groups(grouped):
    """[groups, n, 4 * state / groups] (each group's i, j, f, o) -> [n, 4 * state] in the cell's
    order: all i (group by group), then all j, f and o. Group g drives cells g * state / groups on."""
    groups, size = grouped.shape[0], grouped.shape[2] // 4
    split = tf.reshape(grouped, [groups, tf.shape(grouped)[1], 4, size])
    return tf.reshape(tf.transpose(split, [1, 2, 0, 3]), [tf.shape(grouped)[1], 4 * groups * size])


def gates_to_groups(gates, groups):
    """gates_from_groups undone: [n, 4 * state] -> [groups, n, 4 * state / groups]."""
    split = tf.reshape(gates, [tf.shape(gates)[0], 4, groups, -1])
    return tf.reshape(tf.transpose(split, [2, 0, 1, 3]), [groups, tf.shape(gates)[0], -1])


class GroupedGates(FullGates):
    """G-LSTM (Kuchaiev and Ginsburg 2017): the inputs x and h, and the cells, split into G
    groups; group g's gates come from its own slices of x and h alone, through its own matrix
    [(in + proj) / G, 4 * state / G] (LayerWeights.weight is [G, that]): 1/G of the gate
    matrix's multiply-adds and parameters. The projection stays whole. As f-lm's GLSTMCell:
    group g's slice of each of i, j, f, o is its columns in order."""

    def __init__(self, plan, weights, in_size):
        super().__init__(plan, weights, in_size)  # the per-group input and recurrent rows
        self.groups = weights.weight.shape[0]

    def input_gates(self, rows):
        return gates_from_groups(self.plan.matmul(to_groups(rows, self.groups), self.input_weight))

    def recurrent_gates(self, h):
        return gates_from_groups(self.plan.step_matmul(to_groups(h, self.groups), self.recurrent_forward))

    def d_recurrent(self, d_gates):
        return from_groups(self.plan.step_matmul(gates_to_groups(d_gates, self.groups), self.recurrent_backward))

    def chunk_gradients(self, input_rows, h_prev_rows, d_gates):
        grouped_d_gates = gates_to_groups(d_gates, self.groups)
        layer_inputs = tf.concat([to_groups(input_rows, self.groups), to_groups(h_prev_rows, self.groups),
                                  tf.ones([self.groups, tf.shape(input_rows)[0], 1], input_rows.dtype)], axis=2)
        d_weight_and_bias = self.plan.matmul(layer_inputs, grouped_d_gates, transpose_a=True)
        return from_groups(self.plan.matmul(grouped_d_gates, self.input_weight_t)), (d_weight_and_bias,)

    @staticmethod
    def weight_gradients(summed):
        (d_weight_and_bias,) = summed
        return (d_weight_and_bias[:, :-1],), tf.reshape(gates_from_groups(d_weight_and_bias[:, -1:]), [-1])


def gates_of(weights):
    """The Gates class of a layer's LayerWeights, by the gate matrix's shape."""
    if weights.factor is not None:
        return FactoredGates
    return GroupedGates if weights.weight.shape.rank == 3 else FullGates


def lstmp_layer(input_chunks, state, weights, *, cell=ComposedCell, step_weights=StoredStepWeights,
                compute_dtype=tf.float32):
    """One LSTM-with-projection layer over a window given in time chunks.

    input_chunks: [steps_k, batch, in] tensors, time-major, consecutive; state: the LSTMState
    before the window (the carried state of truncated BPTT: it gets no gradient); weights:
    LayerWeights, whose gate matrix says which LSTM (original, F-LSTM, G-LSTM: gates_of).
    Returns (output chunks [steps_k, batch, proj], the LSTMState after the last step). A
    chunk's outputs are there once its steps are, so what reads them (the sampled softmax, the
    next layer) can start on them beside the next chunk's steps.

    Only the recurrent matmul and the projection run per step; the input half of the gates is
    one matmul per chunk, and so is every weight gradient in the backward, so that one chunk's
    big matmuls run beside another chunk's per-step ones. `cell` and `step_weights` choose how
    the step's arithmetic and the per-step weights are computed (ComposedCell and
    StoredStepWeights here, or cpu_kernels' FusedCell and TransposedStepWeights on the CPU):
    the results are the same."""
    gates = gates_of(weights)
    layer = _custom_gradient_layer(_Compute(tf.as_dtype(compute_dtype), cell, step_weights, gates))
    factor = (weights.factor,) if gates is FactoredGates else ()
    *output_chunks, c, h = layer(state.c, state.h, weights.weight, weights.bias, weights.projection, *factor,
                                 *input_chunks)
    return output_chunks, LSTMState(c, h)


@functools.lru_cache(maxsize=None)
def _custom_gradient_layer(plan):
    """The custom-gradient layer of one _Compute (a custom gradient's arguments are tensors only)."""
    factored = plan.gates is FactoredGates

    @tf.custom_gradient
    def layer(c, h, weight, bias, projection, *factor_and_input_chunks):
        factor, input_chunks = ((factor_and_input_chunks[0], factor_and_input_chunks[1:]) if factored
                                else (None, factor_and_input_chunks))
        return _forward_and_backward(plan, input_chunks, LSTMState(c, h),
                                     LayerWeights(weight, bias, projection, factor))

    return layer


def _forward_and_backward(plan, input_chunks, state, weights):
    in_size = input_chunks[0].shape[2]
    batch = tf.shape(input_chunks[0])[1]
    gates = plan.gates(plan, weights, in_size)
    projection = plan.cast(weights.projection)
    gates.prepare_forward()
    projection_forward = plan.step_weights.forward(projection)
    chunks, start = [], 0  # each chunk's range of steps
    for chunk_inputs in input_chunks:
        chunks.append(range(start, start + chunk_inputs.shape[0]))
        start += chunk_inputs.shape[0]
    steps = start
    chunk_rows = [tf.reshape(chunk_inputs, [-1, in_size]) for chunk_inputs in input_chunks]
    # A window per chunk: the recurrence starts once the first chunk's input gates are there,
    # and the later chunks' matmuls run beside its per-step matmuls.
    windows = [plan.cell.window(tf.reshape(gates.input_gates(rows) + weights.bias, [len(chunk), batch, -1]))
               for rows, chunk in zip(chunk_rows, chunks)]
    c, h = state
    c_prev, h_prev, tanh_cs, memories, outputs = [], [], [], [], []
    for k, chunk in enumerate(chunks):
        for t in chunk:
            c_prev.append(c)
            h_prev.append(h)
            c, memory, tanh_c, windows[k] = plan.cell.forward(windows[k], gates.recurrent_gates(h), c, t - chunk.start)
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
            gates.prepare_backward()
            projection_backward = plan.step_weights.backward(projection)
        d_hs, d_input_chunks, d_summed = [None] * steps, [None] * len(chunks), None
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
                    d_h_next = gates.d_recurrent(d_gates)
            # The chunk's weight gradients once its gate gradients are all there: beside the
            # earlier chunks' per-step matmuls.
            chunk_d_gates = plan.cell.window_rows(windows[k])
            with tf.control_dependencies([chunk_d_gates]):
                d_rows, chunk_d_weights = gates.chunk_gradients(
                    chunk_rows[k], _rows(h_prev[chunk.start:chunk.stop]), chunk_d_gates)
                d_input_chunks[k] = tf.reshape(d_rows, tf.shape(input_chunks[k]))
            d_summed = (chunk_d_weights if d_summed is None
                        else tuple(total + part for total, part in zip(d_summed, chunk_d_weights)))
        # Computed as its transpose [proj, state], then transposed: oneDNN's transposed-A
        # product is faster with the wide matrix as the output's columns.
        d_projection = tf.transpose(plan.matmul(_rows(d_hs), _rows(memories), transpose_a=True))
        (d_weight, *d_factor), d_bias = gates.weight_gradients(d_summed)
        return (tf.zeros_like(c_prev[0]), tf.zeros_like(h_prev[0]), d_weight, d_bias, d_projection, *d_factor,
                *d_input_chunks)

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
