"""The vocabulary's matrices (the embedding, the softmax's weights and biases) and their Adagrad
accumulators: the rows a rank holds, and how they are checkpointed.

Replicated, a rank holds every row, in the original's `num_shards` row blocks; vocabulary-
parallel, one contiguous block of rows that it owns. Either way a checkpoint holds each matrix
whole, as one logical [vocab_size, width] tensor under its own key (`tables/NAME`), written as
slices, TensorFlow's format for partitioned variables: each holder writes its rows, and a
restore reads only the rows the restoring table holds, whatever the mode and the number of
ranks that wrote them.
"""
import dataclasses

import numpy as np
import tensorflow as tf

KEY_PREFIX = "tables/"


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows [first, stop) of the vocabulary."""
    first: int
    stop: int

    @property
    def count(self):
        return self.stop - self.first


def owned_rows(vocab_size, rank, ranks):
    """The contiguous rows rank `rank` of `ranks` owns: the first ranks own one row more when
    the vocabulary does not divide evenly."""
    base, extra = divmod(vocab_size, ranks)
    first = rank * base + min(rank, extra)
    return Rows(first, first + base + (1 if rank < extra else 0))


def owners(ids, vocab_size, ranks):
    """The rank that owns each id (int64 ids, int32 ranks), the inverse of owned_rows."""
    base, extra = divmod(vocab_size, ranks)
    ids = tf.cast(ids, tf.int64)
    # The first `extra` ranks own base + 1 rows each, the others base rows.
    split = extra * (base + 1)
    in_long = ids // (base + 1)
    in_short = extra + (ids - split) // max(base, 1)
    return tf.cast(tf.where(ids < split, in_long, in_short), tf.int32)


class VocabTable:
    """One matrix of the vocabulary (`width` columns, or a vector when width is None, or a
    tuple of trailing dimensions: update.outer keeps any weight's rows this way): the rows this
    process holds, as block variables, and their slices of the logical matrix.

    `blocks` is a list of (Rows, variable): each variable holds its rows, possibly followed by
    padding rows past the vocabulary (the replicated layout's last block), which no checkpoint
    holds."""

    def __init__(self, name, vocab_size, width, blocks):
        self.name, self.vocab_size, self.width = name, vocab_size, width
        self.blocks = list(blocks)

    @property
    def variables(self):
        return [variable for _, variable in self.blocks]

    @property
    def rows(self):
        """The rows held, from the first block's first to the last block's stop."""
        return Rows(self.blocks[0][0].first, self.blocks[-1][0].stop)

    def logical_shape(self):
        trailing = () if self.width is None else (self.width,) if isinstance(self.width, int) else self.width
        return [self.vocab_size, *trailing]

    def slice_spec(self, rows):
        """TensorFlow's "shape first,count:..." spec of `rows` of the logical matrix."""
        shape = self.logical_shape()
        return " ".join(str(d) for d in shape) + f" {rows.first},{rows.count}" + ":-" * (len(shape) - 1)

    def _held_blocks(self):
        """The blocks that hold rows of the vocabulary (with few words and many blocks, the
        last blocks of the original's layout are padding only)."""
        return [(rows, variable) for rows, variable in self.blocks if rows.count > 0]

    def checkpoint_slices(self, key):
        """(key, slice spec, tensor) of each block's rows, under `key` (tables/NAME...)."""
        return [(key, self.slice_spec(rows), variable[:rows.count] if variable.shape[0] > rows.count
                 else variable.read_value()) for rows, variable in self._held_blocks()]

    def restore(self, prefix, key):
        """Reads this table's rows of the logical matrix `key` in checkpoint `prefix`."""
        blocks = self._held_blocks()
        if not blocks:
            return
        restored = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[key] * len(blocks),
                                        shape_and_slices=[self.slice_spec(rows) for rows, _ in blocks],
                                        dtypes=[variable.dtype for _, variable in blocks])
        for (rows, variable), value in zip(blocks, restored):
            if variable.shape[0] > rows.count:
                variable[:rows.count].assign(value)
            else:
                variable.assign(value)


class VocabularyTables:
    """The model's tables of the vocabulary (tables.VocabTable): the embedding, the softmax's
    weights and its biases; with tied embeddings the softmax's weights are the embedding, and
    there are two tables, which is what a checkpoint of a tied model holds."""
    NAMES = ("embedding", "softmax_w", "softmax_b")

    def __init__(self, embedding, softmax_w, softmax_b):
        self.embedding, self.softmax_w, self.softmax_b = embedding, softmax_w, softmax_b

    @property
    def tied(self):
        return self.softmax_w is self.embedding

    def named(self):
        """(name, table) of each distinct table."""
        return [(name, table) for name, table in zip(self.NAMES, (self.embedding, self.softmax_w, self.softmax_b))
                if not (name == "softmax_w" and self.tied)]

    def __iter__(self):
        return iter([table for _, table in self.named()])


def per_row(values, like):
    """`values`, one a row (a number or a flag), shaped to broadcast over the rows of `like`."""
    return tf.reshape(values, [-1] + [1] * (len(like.shape) - 1))


def replicated_blocks(vocab_size, num_shards):
    """The original's layout: `num_shards` blocks of equal rows, the last padded past the
    vocabulary, as TensorFlow's "div" partition of an embedding lookup expects."""
    rows_per_shard = -(-vocab_size // num_shards)
    return [Rows(min(b * rows_per_shard, vocab_size), min((b + 1) * rows_per_shard, vocab_size))
            for b in range(num_shards)]


def _same_layout(table, name, initial_block):
    """A table of the same rows and layout as `table`, each block variable (not trained) starting
    at `initial_block(the table's block variable)`."""
    return VocabTable(name, table.vocab_size, table.width,
                      [(rows, tf.Variable(initial_block(variable), trainable=False, name=f"{name}_{index}"))
                       for index, (rows, variable) in enumerate(table.blocks)])


def like(table, name, initial_value):
    """A table of the same rows and layout as `table`, every entry `initial_value` (Adagrad's
    accumulators)."""
    return _same_layout(table, name, lambda variable: tf.fill(variable.shape, initial_value))


def copy(table, name):
    """A table of the same rows and layout as `table`, holding its values now (the EMA's shadows)."""
    return _same_layout(table, name, lambda variable: variable.read_value())


def save_slices(prefix, tables_and_keys):
    """Writes the slices of each (table, key) into a checkpoint of its own at `prefix`."""
    entries = [entry for table, key in tables_and_keys for entry in table.checkpoint_slices(key)]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[key for key, _, _ in entries],
                      shape_and_slices=[spec for _, spec, _ in entries], tensors=[t for _, _, t in entries])


def variables_of(tables):
    """Every block variable of `tables`, table by table."""
    return [variable for table in tables for variable in table.variables]


def holds_tables(prefix):
    """Whether the checkpoint at `prefix` holds its tables as logical matrices (this format)."""
    return any(name.startswith(KEY_PREFIX) for name, _ in tf.train.list_variables(prefix))


def initial_rows(rows, width, fan_in, block_rows, seeds, uniform):
    """Rows `rows` of the logical initial matrix whose row block b (`block_rows` rows each) is
    uniform([block_rows, width], fan_in, seeds[b]): the same values whichever rows a rank holds."""
    out = np.empty([rows.count, width], np.float32)
    for block in range(rows.first // block_rows, -(-rows.stop // block_rows)):
        start, stop = max(rows.first, block * block_rows), min(rows.stop, (block + 1) * block_rows)
        if start >= stop:
            continue
        values = uniform([block_rows, width], fan_in, seeds[block])
        out[start - rows.first:stop - rows.first] = values[start - block * block_rows:stop - block * block_rows]
    return out
