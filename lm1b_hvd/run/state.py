"""Everything a training run persists, each piece declared once.

`TrainingState._training_pieces` is the list of what training adds to the model's weights and
averages (model.pieces.ModelWeights): Adagrad's step, learning rate and accumulators, every rank's
run position and the records beside it, fp16's loss scale. A sync mode adds its own pieces
(run.modes: a two-level run's outer momentum and its nodes). From the list come what a
checkpoint holds and under which key, what rank 0 broadcasts after the first step (or an
elastic reset), what an elastic commit keeps, what a restore does when a checkpoint lacks a
piece, and what an outer step does with each. Adding a piece of state is one entry;
tests/test_training_state.py fails when a variable a step writes is in no piece.
"""
import tensorflow as tf

from lm1b_hvd import pinned_stack
from lm1b_hvd.data.dataset import StreamPosition
from lm1b_hvd.model import tables
from lm1b_hvd.model.pieces import ACCUMULATOR_SUFFIX, ModelWeights, Piece, Travel
from lm1b_hvd.run.position import RunPoint, RunPosition, row_state_from_array, row_state_to_array
from lm1b_hvd.update.optimizer import FusedAdagrad, PlateauDecay


class TrainingState(ModelWeights):
    """A model's training state: the model's LSTM and tables and their averages, Adagrad's
    accumulators and step, the learning rate and its schedule, every rank's run position."""

    def __init__(self, model):
        super().__init__(model)
        hps = model.hps
        # Adagrad's accumulators of the vocabulary tables, from 1.0 as the original's.
        self.table_accumulators = [tables.like(table, f"{table.name}_accumulator", 1.0) for table in model.tables]
        self.optimizer = FusedAdagrad(hps.learning_rate, zip(model.tables, self.table_accumulators))
        self.optimizer.build(model.lstm_variables)
        self.lr_schedule = PlateauDecay(self.optimizer, hps.lr_decay, hps.lr_patience)
        self.position = RunPosition()
        self.loss_scaler, self._loss_scale_variables = None, []
        self.before_saving = []  # what must be done before the state is saved (an overlapped exchange's end)
        self.add(self._training_pieces())
        # The count of saves tf.train.CheckpointManager keeps (this state numbers them by step).
        self.save_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="save_counter")

    def _training_pieces(self):
        """The list: the one place where a piece of training state is added."""
        model, optimizer = self.model, self.optimizer
        shared_tables = not model.vocab_parallel
        return [
            # The step (iterations) and the learning rate.
            Piece("optimizer", "object", optimizer, [optimizer.iterations, optimizer.learning_rate],
                  travel=Travel.ALIKE),
            # The LSTM's accumulators: Keras saves them with the optimizer.
            Piece("optimizer/accumulators", "inside optimizer", None, optimizer.accumulators(),
                  travel=Travel.AVERAGED, slot_of=model.lstm_variables),
            *(Piece(tables.KEY_PREFIX + name + ACCUMULATOR_SUFFIX, "table", accumulator, accumulator.variables,
                    shared=shared_tables, travel=Travel.AVERAGED, slot_of=table.variables)
              for (name, table), accumulator in zip(model.tables.named(), self.table_accumulators)),
            # Every rank's own: gathered to rank 0 when it saves (record_every_rank), never broadcast.
            # Missing (a checkpoint written without a run): the data order restarts.
            Piece("run_position", "object", self.position, [], shared=False, if_missing=self.position.clear,
                  travel=Travel.PER_RANK),
            # The learning-rate schedule's counts, a record beside the run position.
            Piece("run_position/lr_schedule", "json", self.lr_schedule, [], travel=Travel.ALIKE),
            # fp16's dynamic loss scale: Keras saves it with the optimizer, and restores it when it
            # is made (prepare_loss_scaling), after any restore; a checkpoint written without fp16 lacks
            # it and resumes under fp16 from the initial scale. Equal on every rank by construction.
            *([Piece("optimizer/loss_scale", "inside optimizer", None, self._loss_scale_variables, shared=False,
                     travel=Travel.ALIKE)]
              if model.hps.precision == "fp16" else []),
        ]

    def prepare_loss_scaling(self):
        """With precision=fp16, wraps the optimizer in Keras's dynamic loss scaling once (Keras
        starts at 2^15, where this model's first steps overflow and are skipped: 2^10 here); the
        trainer calls it before its first trace, so after any restore: a scale the checkpoint
        holds is restored when Keras attaches it to the optimizer, and a checkpoint without one
        restores at all (its objects must all match). `loss_scaler` is the wrapper, or None."""
        if self.loss_scaler is None and self.model.hps.precision == "fp16":
            before = {variable.ref() for variable in _variables_of(self.optimizer)}
            self.loss_scaler = pinned_stack.dynamic_loss_scaling(self.optimizer, initial_scale=2 ** 10)
            # Keras attaches the scale to the optimizer: what the optimizer holds now and did not before.
            self._loss_scale_variables.extend(variable for variable in _variables_of(self.optimizer)
                                              if variable.ref() not in before)

    @property
    def step(self):
        """The number of steps taken: Adagrad's iteration count."""
        return self.optimizer.iterations

    def optimizer_slots(self):
        return self.optimizer, self.table_accumulators

    def records(self):
        """The pieces kept as records beside the run position, by their name there."""
        return {piece.key.rsplit("/", 1)[-1]: piece.value for piece in self.pieces if piece.kind == "json"}

    # The run position.

    def record_every_rank(self, point, ranks):
        """Every rank's data position and LSTM rows, into the checkpoint rank 0 will write (a
        collective: every rank calls it), with the records beside them."""
        hps = self.model.hps
        for prepare in self.before_saving:
            prepare()
        entries = ranks.gather_objects((point.position.to_dict(), row_state_to_array(point.row_state)))
        if ranks.is_root:
            self.position.store(hps.seed, hps.batch_size, [entry[0] for entry in entries],
                                [entry[1] for entry in entries],
                                {name: record.state() for name, record in self.records().items()})

    def restored_point(self, ranks):
        """After a restore: (the RunPoint to continue from, why the data order restarts or '',
        the lines the records said as they loaded)."""
        model, hps = self.model, self.model.hps
        said = [record.load(self.position.record(name)) for name, record in self.records().items()]
        fresh = RunPoint.start(int(self.step), model)
        saved = self.position.for_rank(ranks.rank, ranks.size, hps.seed, hps.batch_size)
        notes = [line for line in said if line]
        if saved.unusable:
            return fresh, saved.unusable, notes
        return RunPoint(fresh.step, StreamPosition.from_dict(saved.stream),
                        row_state_from_array(saved.row_state, hps.state_size)), "", notes


def _variables_of(trackable):
    """Every variable `trackable` holds, and the trackables it holds hold."""
    return [node for node in tf.train.TrackableView(trackable).descendants() if isinstance(node, tf.Variable)]
