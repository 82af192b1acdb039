"""The reader of the checkpoint format before the tables were logical matrices (before the
vocabulary could be sharded over the ranks): the tables as the model's block variables
(`model/NAME/BLOCK`), their Adagrad accumulators in the Keras optimizer's slots, one per
variable of the model's earlier variable order. Such checkpoints are read, never written."""
import tensorflow as tf

from lm1b_hvd import pinned_stack
from lm1b_hvd.model import tables

TABLE_NAMES = ("embedding", "softmax_w", "softmax_b")  # the earlier format's tables, never tied


def restore(state, path, saved, optimizer_slots):
    """Restores model.pieces.ModelWeights (or a run.state.TrainingState) from the earlier-format
    checkpoint `path` (`saved`: its keys), and the slots into `optimizer_slots` (the optimizer
    and the tables' accumulators, or None and none); the tables' averages (which that format
    never held) start at the restored weights."""
    model = state.model
    optimizer, table_accumulators = optimizer_slots
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    old_blocks = sum(1 for key in shapes if key.startswith("model/embedding/"))
    old_rows = shapes[pinned_stack.checkpoint_value_key("model/embedding/0")][0]
    state.restore_objects(path, saved, skip=("optimizer",))  # its slots are read below, by their keys
    n_lstm = len(model.lstm_variables)
    # The earlier optimizer's slot k + 1 is the accumulator of the earlier model's variable k:
    # embedding blocks, the LSTM, softmax blocks, softmax biases.
    slots = ([1 + b for b in range(old_blocks)], [1 + old_blocks + n_lstm + b for b in range(old_blocks)],
             [1 + 2 * old_blocks + n_lstm])
    for name, table in zip(TABLE_NAMES, model.tables):
        if name == "softmax_b":
            _read_blocks(reader, table, [pinned_stack.checkpoint_value_key("model/softmax_b")], model.vocab_size)
        else:
            keys = [pinned_stack.checkpoint_value_key(f"model/{name}/{b}") for b in range(old_blocks)]
            _read_blocks(reader, table, keys, old_rows)
    if optimizer is not None:
        optimizer.iterations.assign(reader.get_tensor(pinned_stack.keras_optimizer_iterations_key()))
        for index, accumulator in enumerate(optimizer.accumulators()):
            accumulator.assign(reader.get_tensor(pinned_stack.keras_optimizer_slot_key(1 + old_blocks + index)))
        for table, accumulator_slots in zip(table_accumulators, slots):
            rows = old_rows if len(accumulator_slots) > 1 else model.vocab_size
            _read_blocks(reader, table, [pinned_stack.keras_optimizer_slot_key(k) for k in accumulator_slots], rows)
    for piece in state.pieces:
        if piece.kind == "table" and piece.if_missing:
            piece.if_missing()


def _read_blocks(reader, table, keys, rows_per_key):
    """Fills `table` from the earlier format's blocks (`keys`, `rows_per_key` rows each), one
    block read at a time."""
    for index, key in enumerate(keys):
        block = tables.Rows(index * rows_per_key, (index + 1) * rows_per_key)
        value = None
        for rows, variable in table.blocks:
            first, stop = max(rows.first, block.first), min(rows.stop, block.stop)
            if first >= stop:
                continue
            value = reader.get_tensor(key) if value is None else value
            variable[first - rows.first:stop - rows.first].assign(value[first - block.first:stop - block.first])
