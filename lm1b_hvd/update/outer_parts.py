"""Which rows of each weight a rank owns at outer steps (update.outer), and the outer momentum of
those rows: the part of the outer state that a checkpoint holds. No collective here, so that a
sync mode (run.modes) can declare the momentum as pieces of the state without Horovod."""
import typing

import tensorflow as tf

from lm1b_hvd.model import tables

MOMENTUM_PREFIX = "outer_momentum/"  # checkpoint keys of the outer momentum, one per weight


class OwnedPart(typing.NamedTuple):
    """Rows `rows` of `variable` that this rank steps at outer steps; `gathered`: every rank of
    the node holds `variable` whole, and gathers the other ranks' new rows afterwards. `key`,
    `logical` and `logical_rows`: where the rows sit in the checkpoint's logical matrix."""
    variable: tf.Variable
    rows: tables.Rows
    gathered: bool
    key: str
    logical: tables.VocabTable  # the logical matrix's shape: a table, or one LSTM variable as one
    logical_rows: tables.Rows


def owned_parts(pieces, node):
    """The OwnedPart of every variable of `pieces` (model.pieces.Piece, the weights an outer step
    steps) on this rank of `node` (a Ranks). Of a piece every rank of the node holds alike, each
    rank owns 1/K of each variable's rows; of a vocabulary-parallel table, the rows it holds."""
    parts = []
    for piece in pieces:
        gathered = piece.shared and node.size > 1
        if piece.kind != "table":  # variables of their own: each its own logical matrix
            for variable in piece.variables:
                rows = tables.owned_rows(variable.shape[0], node.rank, node.size)
                shape = tuple(variable.shape)
                logical = tables.VocabTable(_name(variable), shape[0], shape[1:] or None, [])
                parts.append(OwnedPart(variable, rows, gathered, MOMENTUM_PREFIX + _name(variable), logical, rows))
            continue
        for held, variable in piece.value.blocks:
            if piece.shared:
                rows = tables.owned_rows(variable.shape[0], node.rank, node.size)
                logical_rows = tables.Rows(min(held.first + rows.first, held.stop),
                                           min(held.first + rows.stop, held.stop))
            else:
                rows, logical_rows = tables.Rows(0, variable.shape[0]), held
            parts.append(OwnedPart(variable, rows, gathered, MOMENTUM_PREFIX + piece.key, piece.value, logical_rows))
    return parts


def _name(variable):
    return variable.name.split(":")[0]


def owned(variable, rows):
    return variable[rows.first:rows.stop] if rows.count < variable.shape[0] else variable.read_value()


class OuterMomentum:
    """The outer momentum of the rows this rank owns (`parts`, owned_parts'), as slices of each
    weight's logical matrix (tables.VocabTable): a checkpoint holds each whole, and a run on any
    number of nodes and ranks per node reads back the rows it owns."""

    def __init__(self, parts):
        self.parts = parts
        self.variables = [tf.Variable(tf.zeros_like(owned(part.variable, part.rows)), trainable=False,
                                      name=f"{_name(part.variable)}_outer_momentum") for part in self.parts]
        by_key = {}
        for part, momentum in zip(self.parts, self.variables):
            by_key.setdefault(part.key, (part.logical, []))[1].append((part.logical_rows, momentum))
        self.tables = [(key, tables.VocabTable(logical.name + "_outer_momentum", logical.vocab_size, logical.width,
                                               blocks)) for key, (logical, blocks) in by_key.items()]

    def named(self):
        """(checkpoint key, VocabTable) of each weight's momentum."""
        return self.tables

    def zero(self):
        """No momentum yet: a checkpoint of a synchronous run, or of none."""
        for momentum in self.variables:
            momentum.assign(tf.zeros_like(momentum))
