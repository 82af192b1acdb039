"""The CPU's faster variants of three pieces of ops.py, chosen by compute_plan.py for `kernels=cpu`:

- FusedCell: a step's gate arithmetic, forward and backward, each one kernel of
  lm1b_hvd/model/kernels/lstmp_cell.cc instead of ~25 TensorFlow ops (on a small model the ops'
  scheduling costs more than their arithmetic);
- fused_candidate_softmax: the sampled softmax's bias add, softmax and log-sum-exp as one
  pass over the logits (kernels/candidate_softmax.cc) where the composed ops make three, each
  out of cache;
- TransposedStepWeights: the per-step matmuls take their weights transposed ([n, k],
  transpose_b), which oneDNN's AVX2 kernels multiply by `batch` rows faster than [k, n] ones
  (its AVX-512 kernels the other way round: devices.onednn_avx512).

Same math as ops.ComposedCell, ops.composed_candidate_softmax and ops.StoredStepWeights
(tests/test_ops.py checks each against autodiff of the textbook version). The kernels are
built by setup.py for CPU installs only; a GPU install runs without them.
"""
import functools
import importlib.util

import tensorflow as tf

from lm1b_hvd import console
from lm1b_hvd.model import ops

REBUILD = "reinstall the package with `pip install --no-build-isolation .` (bash install.sh does)"


def library_name():
    """The op library of this TensorFlow's stack: setup.py builds one per stack
    (lm1b_hvd.model._kernels_tf2_15, _kernels_tf2_20), so that environments of one checkout on
    different stacks do not load each other's."""
    return "lm1b_hvd.model._kernels_tf" + "_".join(tf.__version__.split(".")[:2])


def built():
    """Whether setup.py built this stack's op library into this installation."""
    return importlib.util.find_spec(library_name()) is not None


@functools.lru_cache(maxsize=None)
def load():
    """The op library that setup.py builds from lm1b_hvd/model/kernels/*.cc."""
    spec = importlib.util.find_spec(library_name())
    if spec is None:
        raise console.UserError(f"lm1b_hvd's CPU kernels are not built: {REBUILD}, "
                                "or train with --hpconfig kernels=portable")
    try:
        return tf.load_op_library(spec.origin)
    except tf.errors.NotFoundError as error:  # built against another TensorFlow
        raise console.UserError(f"lm1b_hvd's CPU kernels do not load into this TensorFlow: {error}; "
                                f"{REBUILD}") from None


class FusedCell:
    """ops.ComposedCell's math, forward and backward each one CPU kernel. The window is the
    [steps, batch, 4 * state] tensor itself, which the kernels write in place (no buffer of
    activations beside the gates', and no stacking of the steps' gradients after the loop)."""

    @staticmethod
    def window(input_gates):
        return input_gates

    @staticmethod
    def forward(window, recurrent_gates, c_prev, step):
        c, memory, window, tanh_c = load().lstmp_cell(window, recurrent_gates, c_prev, forget_bias=ops.FORGET_BIAS,
                                                      step=step)
        return c, memory, tanh_c, window

    @staticmethod
    def backward(window, tanh_c, c_prev, d_c, d_memory, step):
        window, d_c_prev = load().lstmp_cell_grad(window, tanh_c, c_prev, d_c, d_memory, step=step)
        return window, window[step], d_c_prev

    @staticmethod
    def window_rows(window):
        return tf.reshape(window, [-1, window.shape[-1]])


def fused_candidate_softmax(logits, biases):
    """ops.composed_candidate_softmax as one kernel: (softmax, log-sum-exp) of each row of
    logits + biases, in the logits' buffer."""
    return load().candidate_softmax(logits, biases)


class TransposedStepWeights:
    """The per-step matmuls multiply by each weight's transpose, made once per window, with
    transpose_b; their backward by the weight as stored."""
    transpose_b = True

    @staticmethod
    def forward(weight):
        return ops.transposed(weight)

    @staticmethod
    def backward(weight):
        return weight
