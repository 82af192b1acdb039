"""The pieces a run's state is made of, each declared once, and what is done with all of them.

A `Piece` says its checkpoint key, its kind, whether every rank holds it alike, what a restore
does when a checkpoint lacks it, and how it travels in a two-level run (`Travel`: what an outer
step does with it). From the list, `StatePieces` writes one checkpoint, restores it (each table
reading the rows it holds), broadcasts what every rank shares and lists itself; update.outer
steps, averages, keeps or rolls back each piece as it says.

`ModelWeights` is the model's weights and their averages: what evaluation, `score`, `sample`
and `export` read (no optimizer, nothing of the update or the exchange). run.state's
TrainingState adds what training persists.

The checkpoint format: the vocabulary's tables (and their accumulators and averages) as whole
logical matrices under `tables/NAME...`, written as slices by whoever holds their rows
(model.tables); the rest as TensorFlow's object checkpoint (`model`, `optimizer`,
`ema_shadows`, `run_position`). Each is written as a checkpoint of its own into a folder beside
the prefix, then TensorFlow's MergeV2Checkpoints makes them one, as its own sharded saves do.
"""
import dataclasses
import enum
import os
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.model import averaging, tables
from lm1b_hvd.model import earlier_format

PARTS_SUFFIX = "_parts"  # the folder a checkpoint's parts are written to before they are merged
NODE_COPIES = "nodes/"  # nodes/N/KEY: node N's own copy of KEY, in a two-level run that keeps state per node
ACCUMULATOR_SUFFIX = "/adagrad_accumulator"  # tables/NAME + this: Adagrad's accumulator of a table
AVERAGE_SUFFIX = "/exponential_moving_average"  # tables/NAME + this: the EMA of a table (average_tables)


class Travel(enum.Enum):
    """What a two-level run does with a piece at an outer step (update.outer), and when a run
    stops between two outer steps."""
    STEPPED = "stepped by the outer optimizer from the nodes' mean change"  # the weights
    AVERAGED = "averaged over the nodes"  # a slot of a weight (`slot_of`): the nodes' changes averaged
    KEPT_PER_NODE = "kept per node"  # a slot of a weight that each node goes on with
    FOLLOWS = "moved towards the new weights, alike on every node"  # the averages (`slot_of`: what they average)
    ALIKE = "alike on every node"  # counts, the learning rate: nothing to exchange
    PER_RANK = "each rank's own, carried on"  # the data position and the LSTM rows
    OUTER = "the outer step's own"  # its momentum

    @property
    def rolled_back(self):
        """Whether a stop between outer steps takes the piece back to the last outer step's
        value (what the steps since changed)."""
        return self in (Travel.STEPPED, Travel.AVERAGED, Travel.KEPT_PER_NODE, Travel.ALIKE)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a run's state.

    kind: "object", a trackable saved in the object checkpoint under `key` (its `variables` are
    those rank 0 broadcasts and an elastic commit keeps); "table", a tables.VocabTable saved as
    the logical matrix `key`; "inside optimizer", variables that Keras saves and restores with the
    optimizer's object; "json", a record kept in the run position's JSON under the last part of
    `key` (its `value` has state(), a JSON value or None, and load(that or None), which may
    return a line for the run to say). `shared`: every rank holds the same values (broadcast from rank 0);
    `if_missing`: what a restore does when the checkpoint lacks the piece (None: the restore
    fails); `travel`: what an outer step does with it; `slot_of`: for a slot or an average, the
    weights its `variables` belong to, in the same order; `restore`: a table's own restore,
    restore(path, the checkpoint's keys), in place of reading `key` (a node's copy: run.modes)."""
    key: str
    kind: str
    value: object
    variables: list
    _: dataclasses.KW_ONLY
    travel: Travel
    shared: bool = True
    if_missing: typing.Callable = None
    slot_of: list = None
    restore: typing.Callable = None


class StatePieces:
    """A list of pieces (`pieces`) and what is done with all of them."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def add(self, pieces):
        """More pieces: those of the sync mode (run.modes), which knows what it keeps."""
        self.pieces += pieces

    def of(self, *travels):
        """The pieces that travel one of these ways."""
        return [piece for piece in self.pieces if piece.travel in travels]

    def variables(self):
        """Every variable of every piece."""
        return [variable for piece in self.pieces for variable in piece.variables]

    def shared_variables(self):
        """What every rank holds alike: broadcast from rank 0 after the first step, kept by an
        elastic commit. Not the LSTM row states, nor, vocabulary-parallel, the tables."""
        return [variable for piece in self.pieces if piece.shared for variable in piece.variables]

    def broadcast_from_root(self, ranks):
        ranks.broadcast_from_root(self.shared_variables())

    def describe(self):
        """One line per piece: its checkpoint key, what it holds, who holds it."""
        lines = []
        for piece in self.pieces:
            size = sum(int(np.prod(variable.shape)) for variable in piece.variables)
            where = "every rank alike" if piece.shared else "each rank its own"
            lines.append(f"{piece.key}: {piece.kind}, {len(piece.variables)} variable(s), {size:,} values, {where}; "
                         f"at an outer step {piece.travel.value}")
        return lines

    # Checkpoints.

    def table_pieces(self):
        return [piece for piece in self.pieces if piece.kind == "table"]

    def write_tables_part(self, file_prefix, part=0, writes=None):
        """This process's rows of the tables, as part `part` of the checkpoint `file_prefix`:
        those `writes(piece)` says, or by default those it holds alone, and in part 0 those every
        rank holds alike."""
        parts = file_prefix + PARTS_SUFFIX
        tf.io.gfile.makedirs(parts)  # SaveV2 makes no folders; each rank may be the first here
        writes = writes or (lambda piece: part == 0 or not piece.shared)
        tables.save_slices(os.path.join(parts, f"tables-{part}"),
                           [(piece.value, piece.key) for piece in self.table_pieces() if writes(piece)])

    def write(self, file_prefix, table_parts=1):
        """Writes the checkpoint `file_prefix`. `table_parts` 1: this process holds every row and
        writes the tables itself; N: each of N ranks wrote its own part (write_tables_part)
        before, and they are merged here."""
        parts = file_prefix + PARTS_SUFFIX
        # A checkpoint object made for this write: one made before would miss what Keras attached
        # to the optimizer since (the loss scale, at the first step).
        objects = tf.train.Checkpoint(**{piece.key: piece.value for piece in self.pieces if piece.kind == "object"})
        objects_part = objects.write(os.path.join(parts, "objects"))
        if table_parts == 1:
            self.write_tables_part(file_prefix)
        table_files = [os.path.join(parts, f"tables-{part}") for part in range(table_parts)]
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[objects_part, *table_files], destination_prefix=file_prefix)
        return file_prefix

    def restore(self, path):
        """Restores every piece from the checkpoint `path` (a checkpoint of this format), each
        table reading the rows it holds; a piece the checkpoint lacks takes its `if_missing`, or
        the restore fails (AssertionError, or TensorFlow's error for an unreadable file). The
        checkpoint may hold more than these pieces (a training checkpoint read for inference)."""
        saved = dict(tf.train.list_variables(path))
        self.restore_objects(path, saved)
        for piece in self.table_pieces():
            if piece.restore:
                piece.restore(path, saved)
            elif piece.key in saved:
                piece.value.restore(path, piece.key)
            else:
                missing(piece)

    def restore_objects(self, path, saved, skip=()):
        """Restores the object pieces (but `skip`) that the checkpoint `path` holds (`saved`:
        its keys); the others take their `if_missing`, or the restore fails."""
        present = {}
        for piece in self.pieces:
            if piece.kind != "object" or piece.key in skip:
                continue
            if any(key.startswith(piece.key + "/") for key in saved):
                present[piece.key] = piece.value
            else:
                missing(piece)
        status = tf.train.Checkpoint(**present).read(path)  # read: the save counter is not this state's
        status.expect_partial()  # what these pieces do not hold (inference) stays unread
        status.assert_existing_objects_matched()


class ModelWeights(StatePieces):
    """The model's weights and their averages (the EMA that evaluation and inference read):
    its LSTM, its vocabulary tables, and their averages."""

    def __init__(self, model):
        self.model = model
        self.ema = averaging.model_average(model)
        shared_tables = not model.vocab_parallel  # vocabulary-parallel, each rank holds rows of its own
        named = model.tables.named()  # tied embeddings: no softmax_w of its own
        ema = self.ema
        super().__init__([
            # The LSTM's weights: what tf.Module tracks of the model (the tables are kept apart).
            Piece("model", "object", model, model.lstm_variables, travel=Travel.STEPPED),
            Piece("ema_shadows", "object", ema.shadows, ema.shadows, travel=Travel.FOLLOWS,
                  slot_of=model.lstm_variables),
            *(Piece(tables.KEY_PREFIX + name, "table", table, table.variables, shared=shared_tables,
                    travel=Travel.STEPPED) for name, table in named),
            # A checkpoint of a run that did not average its tables: the averages start at its
            # weights, as a fresh run's start at the initial ones.
            *(Piece(tables.KEY_PREFIX + name + AVERAGE_SUFFIX, "table", average, average.variables,
                    shared=shared_tables, if_missing=starting_at(average, table), travel=Travel.FOLLOWS,
                    slot_of=table.variables)
              for (name, table), average in zip(named, ema.table_shadows)),
        ])

    def restore(self, path):
        """Restores every piece from the checkpoint `path`; a checkpoint of the earlier format
        (the tables as the model's block variables) reads too (model.earlier_format)."""
        saved = dict(tf.train.list_variables(path))
        if not any(key.startswith(tables.KEY_PREFIX) for key in saved):
            earlier_format.restore(self, path, saved, self.optimizer_slots())
            return
        super().restore(path)

    def optimizer_slots(self):
        """(the optimizer, the tables' accumulators) an earlier-format checkpoint's slots are
        read into: none here."""
        return None, []


def missing(piece):
    """What a restore does with a piece the checkpoint lacks: its `if_missing`, or it fails."""
    if not piece.if_missing:
        raise AssertionError(f"the checkpoint holds no {piece.key}")
    piece.if_missing()


def starting_at(average, table):
    """The averages of `table` start at its values (a checkpoint without them)."""
    def start():
        for shadow, variable in zip(average.variables, table.variables):
            shadow.assign(variable)
    return start
