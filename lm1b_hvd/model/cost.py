"""What the model costs, counted from its shapes: parameters, FLOPs per trained word, and the
bytes a rank holds per vocabulary row (docs/design.md, "Cost model")."""
import typing


def gate_multiply_adds(hps, inputs):
    """Multiply-adds of one layer's gates per word: (inputs + projected) x 4 state for the
    original; through the inner size R for F-LSTM ((inputs + projected) x R + R x 4 state); 1/G
    of the original's for G-LSTM. Also the gate matrices' parameter count."""
    rows = inputs + hps.projected_size
    if hps.lstm_factor:
        return rows * hps.lstm_factor + hps.lstm_factor * 4 * hps.state_size
    return rows * 4 * hps.state_size // hps.lstm_groups


class ParameterCount(typing.NamedTuple):
    """The model's parameters by part, counted from the shapes (no padding rows)."""
    lstm: int
    embedding: int
    softmax: int  # its weights (none of its own when tied) and biases

    @property
    def total(self):
        return self.lstm + self.embedding + self.softmax


def parameter_count(hps, vocab_size):
    lstm = 0
    for layer in range(hps.num_layers):
        inputs = hps.emb_size if layer == 0 else hps.projected_size
        lstm += gate_multiply_adds(hps, inputs) + 4 * hps.state_size + hps.state_size * hps.projected_size
    softmax = vocab_size * (1 if hps.tie_embeddings else 1 + hps.projected_size)
    return ParameterCount(lstm, vocab_size * hps.emb_size, softmax)


def table_bytes_per_row(hps):
    """Bytes a rank holds per vocabulary row it holds: the tables' fp32 values and their Adagrad
    accumulators (whatever the precision, the tables stay fp32)."""
    widths = hps.emb_size + (0 if hps.tie_embeddings else hps.projected_size) + 1
    return 2 * 4 * widths


def training_flops_per_word(hps, vocab_size):
    """Model FLOPs of one trained word, counted from the shapes: per LSTMP layer the gates
    (gate_multiply_adds) and the projection (state x projected), then the softmax (sampled
    candidates plus the true word, or the whole vocabulary); x2 for multiply-adds, x3 for the
    backward's two matmuls per forward one."""
    multiply_adds = 0
    for layer in range(hps.num_layers):
        inputs = hps.emb_size if layer == 0 else hps.projected_size
        multiply_adds += gate_multiply_adds(hps, inputs) + hps.state_size * hps.projected_size
    sampled = 0 < hps.num_sampled < vocab_size
    multiply_adds += (hps.num_sampled + 1 if sampled else vocab_size) * hps.projected_size
    return 2 * 3 * multiply_adds
