"""Everything a training run persists, each piece named once.

`TrainingState.pieces` is the list: what a checkpoint holds and under which key, what rank 0
broadcasts after the first step (or an elastic reset), what an elastic commit keeps, what a
restore does when a checkpoint lacks a piece. Adding a piece of state is one entry in
`TrainingState._pieces`; tests/test_training_state.py fails when a variable a step writes is in
no piece.

The checkpoint format: the vocabulary's tables (and their accumulators and averages) as whole
logical matrices under `tables/NAME...`, written as slices by whoever holds their rows
(model.tables); the rest as TensorFlow's object checkpoint (`model`, `optimizer`,
`ema_shadows`, `run_position`). Each is written as a checkpoint of its own into a folder beside
the prefix, then TensorFlow's MergeV2Checkpoints makes them one, as its own sharded saves do.
"""
import dataclasses
import json
import os
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.data.dataset import StreamPosition
from lm1b_hvd.model import averaging, ops, tables
from lm1b_hvd.run import earlier_format
from lm1b_hvd.exchange.ranks import ONE_NODE
from lm1b_hvd.update.optimizer import FusedAdagrad, PlateauDecay
from lm1b_hvd.update.outer_parts import OuterMomentum

PARTS_SUFFIX = "_parts"  # the folder a checkpoint's parts are written to before they are merged
ACCUMULATOR_SUFFIX = "/adagrad_accumulator"  # tables/NAME + this: Adagrad's accumulator of a table
AVERAGE_SUFFIX = "/exponential_moving_average"  # tables/NAME + this: the EMA of a table (average_tables)


class Piece(typing.NamedTuple):
    """One piece of a run's state.

    kind: "object", a trackable saved in the object checkpoint under `key` (its `variables` are
    those rank 0 broadcasts and an elastic commit keeps); "table", a tables.VocabTable saved as
    the logical matrix `key`; "inside optimizer", variables that Keras saves and restores with the
    optimizer's object. `shared`: every rank holds the same values (broadcast from rank 0);
    `if_missing`: what a restore does when the checkpoint lacks the piece (None: the restore fails)."""
    key: str
    kind: str
    value: object
    variables: list
    shared: bool = True
    if_missing: typing.Callable = None


class RankPosition(typing.NamedTuple):
    """What one rank saved: its data position (a StreamPosition dict) and its LSTM rows (an
    array); or neither, and why this run cannot continue from them."""
    stream: dict = None
    row_state: np.ndarray = None
    unusable: str = ""


class RunPosition(tf.Module):
    """Where every rank's data stream and LSTM rows stood when the checkpoint was taken, and the
    learning-rate schedule's counts. Held in the same checkpoint as the weights, so a crash can
    never leave one without the other."""

    def __init__(self):
        super().__init__(name="run_position")
        self.streams = tf.Variable("", dtype=tf.string, trainable=False)  # JSON, see store()
        self.row_states = tf.Variable(tf.zeros([0]), shape=tf.TensorShape(None), trainable=False)

    def store(self, seed, batch_size, positions, row_states, lr_schedule, nodes=None):
        """`positions` (StreamPosition dicts) and `row_states` (arrays), rank by rank, the
        learning-rate schedule's state (update.optimizer.PlateauDecay.state), and a two-level
        run's nodes ([nodes, ranks per node]; None: synchronous)."""
        saved = {"seed": seed, "batch_size": batch_size, "positions": positions, "lr_schedule": lr_schedule}
        self.streams.assign(json.dumps({**saved, "nodes": nodes} if nodes else saved))
        self.row_states.assign(np.stack(row_states))

    def clear(self):
        self.streams.assign("")

    def lr_schedule(self):
        """The learning-rate schedule's state, or None (no position, or saved before the schedule)."""
        return self._saved("lr_schedule")

    def nodes(self):
        """The saving run's [nodes, ranks per node] if it was two-level, else None."""
        return self._saved("nodes")

    def _saved(self, key):
        text = self.streams.numpy().decode()
        return json.loads(text).get(key) if text else None

    def for_rank(self, rank, num_ranks, seed, batch_size):
        """The RankPosition this rank saved; unusable where the saved run differs (rank count,
        batch size, seed) or saved no position."""
        text = self.streams.numpy().decode()
        if not text:
            return RankPosition(unusable="the checkpoint holds no data position")
        saved = json.loads(text)
        positions = saved["positions"]
        if len(positions) != num_ranks:
            return RankPosition(
                unusable=f"the checkpoint was written by {len(positions)} rank(s), this run has {num_ranks}")
        if saved["batch_size"] != batch_size or saved["seed"] != seed:
            return RankPosition(unusable="the checkpoint's batch_size or seed differs from this run's")
        return RankPosition(stream=positions[rank], row_state=self.row_states.numpy()[rank])


@dataclasses.dataclass(frozen=True)
class RunPoint:
    """Where one rank's run stands between two steps: what the loop carries from step to step
    and what a checkpoint gives back, so that the run continues exactly."""
    step: int
    position: StreamPosition  # this rank's training stream
    row_state: list  # this rank's LSTM rows: per layer an ops.LSTMState

    @classmethod
    def start(cls, step, model):
        """Step `step` at the start of the data, the LSTM rows zero."""
        return cls(step, StreamPosition(), model.zero_state(model.hps.batch_size))


def row_state_to_array(row_state):
    """The per-row LSTM state as one array [layers, batch, state_size + projected_size]."""
    return np.stack([np.concatenate([c.numpy(), h.numpy()], axis=1) for c, h in row_state])


def row_state_from_array(array, state_size):
    return [ops.LSTMState(tf.constant(layer[:, :state_size]), tf.constant(layer[:, state_size:]))
            for layer in np.asarray(array, np.float32)]


class TrainingState:
    """A model's training state: the model's LSTM and tables, Adagrad's accumulators and step,
    the learning rate and its schedule, the EMA, every rank's run position; or, with
    `for_training=False`, what reading a trained model needs (the model and its averages: no
    optimizer, whose slots would be a second model-sized allocation nothing reads). A run over
    more than one node of `nodes` (exchange.ranks.NodeGroups) with outer steps (hparam
    outer_every) holds their momentum too (update.outer)."""

    def __init__(self, model, for_training=True, nodes=ONE_NODE):
        hps = model.hps
        self.model = model
        self.ema = averaging.model_average(model)
        self.table_accumulators, self.optimizer, self.lr_schedule, self.position = [], None, None, None
        self.outer_momentum = None
        self.loss_scaler, self._loss_scale_variables = None, []
        if for_training:
            # Adagrad's accumulators of the vocabulary tables, from 1.0 as the original's.
            self.table_accumulators = [tables.like(table, f"{table.name}_accumulator", 1.0) for table in model.tables]
            self.optimizer = FusedAdagrad(hps.learning_rate, zip(model.tables, self.table_accumulators))
            self.optimizer.build(model.lstm_variables)
            self.lr_schedule = PlateauDecay(self.optimizer, hps.lr_decay, hps.lr_patience)
            self.position = RunPosition()
            if hps.outer_every and nodes.two_level:
                self.outer_momentum = OuterMomentum(model, nodes.node)
        self.node_layout = [nodes.count, nodes.node.size] if self.outer_momentum else None
        self.pieces = self._pieces()
        # The count of saves tf.train.CheckpointManager keeps (this state numbers them by step).
        self.save_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="save_counter")

    def _pieces(self):
        """The list: the one place where a piece of state is added."""
        model, ema = self.model, self.ema
        shared_tables = not model.vocab_parallel  # vocabulary-parallel, each rank holds rows of its own
        named = model.tables.named()  # tied embeddings: no softmax_w of its own
        pieces = [
            # The LSTM's weights: what tf.Module tracks of the model (the tables are kept apart).
            Piece("model", "object", model, model.lstm_variables),
            Piece("ema_shadows", "object", ema.shadows, ema.shadows),
            *(Piece(tables.KEY_PREFIX + name, "table", table, table.variables, shared_tables) for name, table in named),
            # A checkpoint of a run that did not average its tables: the averages start at its
            # weights, as a fresh run's start at the initial ones.
            *(Piece(tables.KEY_PREFIX + name + AVERAGE_SUFFIX, "table", average, average.variables, shared_tables,
                    if_missing=_starting_at(average, table))
              for (name, table), average in zip(named, ema.table_shadows)),
        ]
        if self.optimizer is None:
            return pieces
        optimizer = self.optimizer
        return pieces + [
            # The step (iterations), the learning rate and the LSTM's accumulators.
            Piece("optimizer", "object", optimizer,
                  [optimizer.iterations, optimizer.learning_rate] + optimizer.accumulators()),
            *(Piece(tables.KEY_PREFIX + name + ACCUMULATOR_SUFFIX, "table", accumulator, accumulator.variables,
                    shared_tables) for (name, _), accumulator in zip(named, self.table_accumulators)),
            # Every rank's own: gathered to rank 0 when it saves (record_every_rank), never broadcast.
            # Missing (a checkpoint written without a run): the data order restarts.
            Piece("run_position", "object", self.position, [], shared=False, if_missing=self.position.clear),
            # fp16's dynamic loss scale: Keras saves it with the optimizer, and restores it when it
            # is made (prepare_loss_scaling), after any restore; a checkpoint written without fp16 lacks
            # it and resumes under fp16 from the initial scale. Equal on every rank by construction.
            *([Piece("optimizer/loss_scale", "inside optimizer", None, self._loss_scale_variables, shared=False)]
              if self.model.hps.precision == "fp16" else []),
            # The outer steps' momentum (two-level runs), of the rows each rank owns at outer steps.
            # Missing (a synchronous run's checkpoint): none yet.
            *(Piece(key, "table", table, table.variables, shared=False, if_missing=self.outer_momentum.zero)
              for key, table in (self.outer_momentum.named() if self.outer_momentum else ())),
        ]

    def prepare_loss_scaling(self):
        """With precision=fp16, wraps the optimizer in Keras's dynamic loss scaling once (Keras
        starts at 2^15, where this model's first steps overflow and are skipped: 2^10 here); the
        trainer calls it before its first trace, so after any restore: a scale the checkpoint
        holds is restored when Keras attaches it to the optimizer, and a checkpoint without one
        restores at all (its objects must all match). `loss_scaler` is the wrapper, or None."""
        if self.loss_scaler is None and self.optimizer is not None and self.model.hps.precision == "fp16":
            before = {variable.ref() for variable in _variables_of(self.optimizer)}
            self.loss_scaler = tf.keras.mixed_precision.LossScaleOptimizer(self.optimizer, initial_scale=2 ** 10)
            # Keras attaches the scale to the optimizer: what the optimizer holds now and did not before.
            self._loss_scale_variables.extend(variable for variable in _variables_of(self.optimizer)
                                              if variable.ref() not in before)

    @property
    def step(self):
        """The number of steps taken: Adagrad's iteration count."""
        return self.optimizer.iterations

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
            lines.append(f"{piece.key}: {piece.kind}, {len(piece.variables)} variable(s), {size:,} values, {where}")
        return lines

    # Checkpoints.

    def table_pieces(self):
        return [piece for piece in self.pieces if piece.kind == "table"]

    def write_tables_part(self, file_prefix, part=0):
        """This process's rows of every table, as part `part` of the checkpoint `file_prefix`
        (the tables every rank holds alike: part 0 alone)."""
        parts = file_prefix + PARTS_SUFFIX
        tf.io.gfile.makedirs(parts)  # SaveV2 makes no folders; each rank may be the first here
        tables.save_slices(os.path.join(parts, f"tables-{part}"), [(piece.value, piece.key)
                                                                   for piece in self.table_pieces()
                                                                   if part == 0 or not piece.shared])

    def write(self, file_prefix, table_parts=1):
        """Writes the checkpoint `file_prefix`. `table_parts` 1: this process holds every row and
        writes the tables itself; N: each of N vocabulary-parallel ranks wrote its own part
        (write_tables_part) before, and they are merged here."""
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
        """Restores every piece from the checkpoint `path`, each table reading the rows it holds;
        a piece the checkpoint lacks takes its `if_missing`, or the restore fails (AssertionError,
        or TensorFlow's error for an unreadable file). The checkpoint may hold more than this
        state (a training checkpoint read for inference). A checkpoint of the earlier format
        (the tables as the model's block variables) reads too (run.earlier_format)."""
        saved = dict(tf.train.list_variables(path))
        if not any(key.startswith(tables.KEY_PREFIX) for key in saved):
            earlier_format.restore(self, path, saved)
            return
        self.restore_objects(path, saved)
        for piece in self.table_pieces():
            if piece.key in saved:
                piece.value.restore(path, piece.key)
            else:
                _missing(piece)

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
                _missing(piece)
        status = tf.train.Checkpoint(**present).read(path)  # read: the save counter is not this state's
        status.expect_partial()  # what this state does not hold (inference) stays unread
        status.assert_existing_objects_matched()

    # The run position.

    def record_every_rank(self, point, ranks):
        """Every rank's data position and LSTM rows, into the checkpoint rank 0 will write (a
        collective: every rank calls it)."""
        hps = self.model.hps
        entries = ranks.gather_objects((point.position.to_dict(), row_state_to_array(point.row_state)))
        if ranks.is_root:
            self.position.store(hps.seed, hps.batch_size, [entry[0] for entry in entries],
                                [entry[1] for entry in entries], self.lr_schedule.state(), self.node_layout)

    def regrouping(self):
        """After a restore: what becomes of the outer momentum when the checkpoint's run had
        other nodes than this one ('' when the same, or neither two-level)."""
        saved, now = self.position.nodes(), self.node_layout
        if saved == now:
            return ""
        if now is None:
            return (f"the checkpoint's run was two-level ({saved[0]} nodes x {saved[1]} ranks): its outer momentum is "
                    "not used")
        if saved is None:
            return "the checkpoint's run was synchronous: the outer momentum starts at zero"
        return (f"the checkpoint's run had {saved[0]} nodes x {saved[1]} ranks, this one {now[0]} x {now[1]}: "
                "each rank "
                "reads the outer momentum of the rows it owns now")

    def restored_point(self, ranks):
        """After a restore: (the RunPoint to continue from, and why the data order restarts, or
        ''). The schedule's counts are loaded too."""
        model, hps = self.model, self.model.hps
        self.lr_schedule.load(self.position.lr_schedule())
        fresh = RunPoint.start(int(self.step), model)
        saved = self.position.for_rank(ranks.rank, ranks.size, hps.seed, hps.batch_size)
        if saved.unusable:
            return fresh, saved.unusable
        return RunPoint(fresh.step, StreamPosition.from_dict(saved.stream),
                        row_state_from_array(saved.row_state, hps.state_size)), ""


def _variables_of(trackable):
    """Every variable `trackable` holds, and the trackables it holds hold."""
    return [node for node in tf.train.TrackableView(trackable).descendants() if isinstance(node, tf.Variable)]


def _missing(piece):
    if not piece.if_missing:
        raise AssertionError(f"the checkpoint holds no {piece.key}")
    piece.if_missing()


def _starting_at(average, table):
    def start():
        for shadow, variable in zip(average.variables, table.variables):
            shadow.assign(variable)
    return start
