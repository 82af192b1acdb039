"""The exponential moving average of the weights, which evaluation, `score`, `sample` and
`export` read instead of the last step's weights (hparam average_params, the original's
eval_test_ave): of the LSTM, and with average_tables of the vocabulary's tables too."""
import contextlib

import tensorflow as tf

from lm1b_hvd.model import tables


class ExponentialMovingAverage:
    """Shadow copies of some variables, moved towards them after each step (constant decay).

    `vocab_tables`: vocabulary tables averaged too (average_tables). Their shadows are tables
    of the same rows (`table_shadows`, checkpointed as logical matrices like the tables): a
    second copy of each table and a pass over it every step, which is why the original
    averages the LSTM only."""

    def __init__(self, variables, decay, vocab_tables=()):
        self.decay = decay
        self.shadows = [tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "_ema") for v in variables]
        self.table_shadows = [tables.copy(table, f"{table.name}_ema") for table in vocab_tables]
        self._pairs = list(zip(self.shadows, variables)) + list(zip(
            tables.variables_of(self.table_shadows), tables.variables_of(vocab_tables)))

    def update(self):
        """One step's move towards the targets."""
        move_towards(self._pairs, self.decay)

    def start_at_targets(self):
        """The averages start again at the targets' values (a run started from other weights)."""
        for shadow, target in self._pairs:
            shadow.assign(target)

    def copy_averages_to_targets(self):
        """The targets take the averages' values: for good, where nothing trains afterwards
        (inference), or inside swapped_in."""
        for shadow, target in self._pairs:
            target.assign(shadow)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the targets hold the averages; afterwards their own values again."""
        saved = [tf.identity(target) for _, target in self._pairs]
        self.copy_averages_to_targets()
        try:
            yield
        finally:
            for value, (_, target) in zip(saved, self._pairs):
                target.assign(value)


def move_towards(pairs, decay, steps=1):
    """Each (average, target) of `pairs` moved as `steps` steps of an average of this `decay`
    would move it towards a target that stood still for them (update.outer: the weights between
    outer steps): by 1 - decay ** steps of the way."""
    rate = 1.0 - decay ** steps
    for average, target in pairs:
        average.assign_sub(rate * (average - target))


def model_average(model):
    """The EMA a run of `model` keeps: of the LSTM, and of the vocabulary's tables with
    average_tables when evaluation reads the averages (average_params)."""
    hps = model.hps
    averaged_tables = model.tables if hps.average_tables and hps.average_params else ()
    return ExponentialMovingAverage(model.lstm_variables, hps.ema_decay, vocab_tables=averaged_tables)


def evaluation_weights(ema, hps):
    """The weights evaluation runs with, for the block: the EMA's averages when the run keeps
    them (average_params, the original's eval_test_ave), else the trained weights."""
    return ema.swapped_in() if hps.average_params else contextlib.nullcontext()
