"""The log directory as the unit of resumption: checkpoints, the best one, and the run's hparams.

Layout of a log directory:
  hparams.json          the record the run started with; a resume must agree on model shapes
  ckpt-STEP.*, checkpoint   the latest checkpoints (weights, Adagrad slots, step, EMA, and every
                        rank's data position and LSTM row state: the run continues exactly)
  best/ckpt-STEP.*, best/best.json   the checkpoint with the lowest heldout perplexity so far
  train/, eval/         TensorBoard event files of the trainer (and eval_*/ of evaluate.py)
  run.lock              held by rank 0 of the run that owns the directory (run_lock.py)
  progress.json         the latest progress line's figures, for lm1b_hvd.status
"""
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd import console, data, distributed, hparams as hparams_lib, tables
from lm1b_hvd.logdir_files import BEST_DIR, BEST_FILE, HPARAMS_FILE
from lm1b_hvd.model import VocabularyTables

CHECKPOINT_NAME = "ckpt"  # tf.train.CheckpointManager's default prefix


class CheckpointError(console.UserError):
    """A log directory that cannot be resumed with the requested settings."""


class RankPosition(typing.NamedTuple):
    """What one rank saved: its data position (a StreamPosition dict) and its LSTM rows (an
    array); or neither, and why this run cannot continue from them."""
    stream: dict = None
    row_state: np.ndarray = None
    unusable: str = ""


class RunPosition(tf.Module):
    """Where every rank's data stream and LSTM rows stood when the checkpoint was taken. Held in
    the same checkpoint as the weights, so a crash can never leave one without the other."""

    def __init__(self):
        super().__init__(name="run_position")
        self.streams = tf.Variable("", dtype=tf.string, trainable=False)  # JSON, see store()
        self.row_states = tf.Variable(tf.zeros([0]), shape=tf.TensorShape(None), trainable=False)

    def store(self, seed, batch_size, positions, row_states, lr_schedule):
        """`positions` (StreamPosition dicts) and `row_states` (arrays), rank by rank, and the
        learning-rate schedule's state (training.PlateauDecay.state)."""
        self.streams.assign(json.dumps({"seed": seed, "batch_size": batch_size, "positions": positions,
                                        "lr_schedule": lr_schedule}))
        self.row_states.assign(np.stack(row_states))

    def lr_schedule(self):
        """The learning-rate schedule's state, or None (no position, or saved before the schedule)."""
        text = self.streams.numpy().decode()
        return json.loads(text).get("lr_schedule") if text else None

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
    position: data.StreamPosition  # this rank's training stream
    row_state: list  # this rank's LSTM rows: per layer an ops.LSTMState

    @classmethod
    def start(cls, step, model):
        """Step `step` at the start of the data, the LSTM rows zero."""
        return cls(step, data.StreamPosition(), model.zero_state(model.hps.batch_size))


class RunCheckpoints:
    """A training run's checkpoints: the trainer's weights, Adagrad slots, step and EMA with
    every rank's RunPoint, in one checkpoint that rank 0 writes (`writer`). Vocabulary-parallel,
    every rank writes its rows of the tables into it first (the log directory must be on a
    filesystem every node sees, as a cluster's is)."""

    def __init__(self, logdir, trainer, keep, writer):
        self.trainer = trainer
        self.positions = RunPosition()
        table_parts = distributed.size() if trainer.model.vocab_parallel else 1
        checkpoint = RunCheckpoint(trainer.model, trainer.ema, trainer.optimizer, trainer.table_accumulators,
                                   self.positions, table_parts=table_parts)
        self.keeper = CheckpointKeeper(logdir, checkpoint, keep, writer)

    def set_writer(self, writer):
        self.keeper.writer = writer

    def restore(self, log):
        """The RunPoint to start from: the latest checkpoint's, exactly, when it was written by as
        many ranks with the same batch and seed; else its weights from the start of the data;
        without a checkpoint, step 0. Says which in one line through `log`."""
        path = self.keeper.restore_latest(log)
        model, hps = self.trainer.model, self.trainer.model.hps
        fresh = RunPoint.start(int(self.trainer.global_step), model)
        if not path:
            log("starting from scratch")
            return fresh
        self.trainer.lr_schedule.load(self.positions.lr_schedule())
        saved = self.positions.for_rank(distributed.rank(), distributed.size(), hps.seed, hps.batch_size)
        if saved.unusable:
            log(f"resumed from {path} at step {fresh.step}; {saved.unusable}: the data order restarts "
                "and the LSTM rows start from zero")
            return fresh
        position = data.StreamPosition.from_dict(saved.stream)
        log(f"resumed from {path} at step {fresh.step} (epoch {position.epoch}, the same data position "
            "and LSTM rows)")
        return RunPoint(fresh.step, position, model.state_from_array(saved.row_state))

    def _record_every_rank(self, point):
        """Every rank's data position and LSTM rows, into the checkpoint rank 0 will write (a
        collective: every rank calls it)."""
        model, hps = self.trainer.model, self.trainer.model.hps
        entries = distributed.gather_objects((point.position.to_dict(), model.state_to_array(point.row_state)))
        if self.keeper.writer:
            self.positions.store(hps.seed, hps.batch_size, [entry[0] for entry in entries],
                                 [entry[1] for entry in entries], self.trainer.lr_schedule.state())

    def save(self, point):
        self._record_every_rank(point)
        self.keeper.save(point.step)

    def save_if_best(self, point, perplexity):
        """Keeps `point` under best/ when `perplexity` beats the best so far; whether it did."""
        self._record_every_rank(point)
        return self.keeper.save_if_best(point.step, perplexity)


PARTS_SUFFIX = "_parts"  # the folder a checkpoint's parts are written to before they are merged
AVERAGE_SUFFIX = "/exponential_moving_average"  # tables/NAME + this: the EMA of a table (average_tables)


class RunCheckpoint:
    """One checkpoint of a run: the model's LSTM, the optimizer's step and LSTM slots, the EMA's
    LSTM shadows and the run position as TensorFlow's object-based checkpoint, and the
    vocabulary tables (with Adagrad's accumulators when an optimizer is given, and the EMA's
    averages of them with average_tables) as logical matrices (tables.py). Each part is
    written by its own writer into a folder beside the prefix, then TensorFlow's
    MergeV2Checkpoints makes them one checkpoint, as its own sharded saves do.

    CheckpointManager calls `_write` and `save_counter`, as of a tf.train.Checkpoint."""

    def __init__(self, model, ema, optimizer=None, table_accumulators=(), run_position=None, table_parts=1):
        self.model, self.optimizer = model, optimizer
        self.table_accumulators = list(table_accumulators)
        self.table_averages = list(ema.table_shadows)
        # 1: the writer holds every row and writes the tables itself; N: each of N vocabulary-
        # parallel ranks writes its own part (write_tables_part) before the writer merges them.
        self.table_parts = table_parts
        self.objects = dict(model=model, ema_shadows=ema.shadows)
        if optimizer is not None:
            self.objects["optimizer"] = optimizer
        if run_position is not None:
            self.objects["run_position"] = run_position
        self.checkpoint = tf.train.Checkpoint(**self.objects)

    @property
    def save_counter(self):
        return self.checkpoint.save_counter

    def table_keys(self):
        """(table, checkpoint key) of each table this checkpoint holds."""
        named = self.model.tables.named()  # tied embeddings: no softmax_w of its own
        pairs = [(table, tables.KEY_PREFIX + name) for name, table in named]
        return (pairs + [(table, f"{tables.KEY_PREFIX}{name}/adagrad_accumulator")
                         for (name, _), table in zip(named, self.table_accumulators)]
                + [(table, f"{tables.KEY_PREFIX}{name}{AVERAGE_SUFFIX}")
                   for (name, _), table in zip(named, self.table_averages)])

    def write_tables_part(self, file_prefix, part=0):
        """This process's rows of every table, as part `part` of the checkpoint `file_prefix`."""
        parts = file_prefix + PARTS_SUFFIX
        tf.io.gfile.makedirs(parts)  # SaveV2 makes no folders; each rank may be the first here
        tables.save_slices(os.path.join(parts, f"tables-{part}"), self.table_keys())

    def _write(self, file_prefix, options=None):
        parts = file_prefix + PARTS_SUFFIX
        objects_part = self.checkpoint.write(os.path.join(parts, "objects"))
        if self.table_parts == 1:
            self.write_tables_part(file_prefix)
        table_parts = [os.path.join(parts, f"tables-{part}") for part in range(self.table_parts)]
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[objects_part, *table_parts], destination_prefix=file_prefix)
        for callback in (options.experimental_write_callbacks or []) if options else []:
            callback(file_prefix)
        return file_prefix

    def write(self, file_prefix):
        return self._write(file_prefix)

    def restore(self, path):
        """Restores everything this checkpoint holds from `path`; returns the objects' restore
        status. A checkpoint of the earlier format (the tables as the model's block variables,
        their accumulators in the Keras optimizer) reads too."""
        if not tables.holds_tables(path):
            status = self._restore_earlier_format(path)
            self._start_table_averages_at_the_weights()
            return status
        status = self.checkpoint.restore(path)
        averages_saved = any(name.endswith(AVERAGE_SUFFIX) for name, _ in tf.train.list_variables(path))
        for table, key in self.table_keys():
            if averages_saved or not key.endswith(AVERAGE_SUFFIX):
                table.restore(path, key)
        if not averages_saved:
            self._start_table_averages_at_the_weights()
        return status

    def _start_table_averages_at_the_weights(self):
        """A checkpoint of a run that did not average its tables: their averages start at the
        restored weights, as a fresh run's start at the initial ones."""
        for average, table in zip(self.table_averages, self.model.tables):
            for shadow, variable in zip(average.variables, table.variables):
                shadow.assign(variable)

    def _restore_earlier_format(self, path):
        """Before the tables were logical matrices: model/NAME/BLOCK keys of the original's
        blocks, and the Keras optimizer's slot of every variable in model.all_variables order
        (optimizer/_variables/1 + index)."""
        reader = tf.train.load_checkpoint(path)
        keys = set(reader.get_variable_to_shape_map())
        old_blocks = sum(1 for key in keys if key.startswith("model/embedding/"))
        old_rows = reader.get_variable_to_shape_map()["model/embedding/0/.ATTRIBUTES/VARIABLE_VALUE"][0]
        status = tf.train.Checkpoint(**{k: v for k, v in self.objects.items() if k != "optimizer"}).restore(path)
        status.expect_partial()  # the tables and the optimizer's slots are read below, by their keys
        n_lstm = len(self.model.lstm_variables)
        slots = ([1 + b for b in range(old_blocks)], [1 + old_blocks + n_lstm + b for b in range(old_blocks)],
                 [1 + 2 * old_blocks + n_lstm])
        for name, table, accumulator_slots in zip(VocabularyTables.NAMES, self.model.tables, slots):
            if name == "softmax_b":
                _read_blocks(reader, table, ["model/softmax_b/.ATTRIBUTES/VARIABLE_VALUE"], self.model.vocab_size)
            else:
                _read_blocks(reader, table, [f"model/{name}/{b}/.ATTRIBUTES/VARIABLE_VALUE" for b in range(old_blocks)],
                             old_rows)
        if self.optimizer is not None:
            self.optimizer.iterations.assign(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
            for index, accumulator in enumerate(self.optimizer.lstm_accumulators()):
                accumulator.assign(reader.get_tensor(
                    f"optimizer/_variables/{1 + old_blocks + index}/.ATTRIBUTES/VARIABLE_VALUE"))
            for table, accumulator_slots in zip(self.table_accumulators, slots):
                rows = old_rows if len(accumulator_slots) > 1 else self.model.vocab_size
                _read_blocks(reader, table, [f"optimizer/_variables/{k}/.ATTRIBUTES/VARIABLE_VALUE"
                                             for k in accumulator_slots], rows)
        return status


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


def first_line(err):
    """The part of an error a user needs: its first line, without TensorFlow's op decorations
    ('{{function_node ...}} path; No space left on device [Op:SaveV2]' -> 'No space left on device';
    an eager op's ends '[Op:CreateSummaryFileWriter] name: ')."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, tf.errors.OpError):
        text = re.sub(r"\s*\[Op:\w+\](\s*name:.*)?$", "", re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text))
        text = text.rsplit("; ", 1)[-1]
    return text


@contextlib.contextmanager
def _tensorflow_warnings_muted():
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_or_write_hparams(logdir, hps, vocab_size, write):
    """On a fresh log directory writes hparams.json; on an old one checks the model shapes agree."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise CheckpointError(f"{logdir}: the log directory is a file")
    path = os.path.join(logdir, HPARAMS_FILE)
    record = {**hps.to_dict(), "vocab_size": vocab_size}
    if os.path.exists(path):
        # A key the record lacks was written before that hparam existed: it had its default then.
        saved = {**{key: getattr(hparams_lib.HParams(), key) for key in hparams_lib.MODEL_SHAPE_KEYS},
                 **_read_hparams_record(path)}
        for key in (*hparams_lib.MODEL_SHAPE_KEYS, "vocab_size"):
            if key in saved and saved[key] != record[key]:
                raise CheckpointError(
                    f"{path}: '{key}' is {saved[key]} in this log directory but {record[key]} now; "
                    "use a new --logdir or the same settings")
        return
    if write:
        try:
            os.makedirs(logdir, exist_ok=True)
            console.write_atomically(path, json.dumps(record, indent=1))
        except OSError as err:
            raise CheckpointError(f"{path}: cannot write ({err.strerror or first_line(err)})") from None


def _read_hparams_record(path):
    """The JSON object in hparams.json; anything else is one line naming the file."""
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({first_line(err)}); is it a file this trainer wrote?") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: unreadable (not a JSON object); is it a file this trainer wrote?")
    return saved


def load_run_hparams(logdir):
    """The hparams the run in `logdir` was started with."""
    path = os.path.join(logdir, HPARAMS_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found; is {logdir} a training log directory?")
    record = _read_hparams_record(path)
    record.pop("vocab_size", None)
    unknown = sorted(set(record) - set(hparams_lib.HParams.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{path}: unknown hparam(s) {', '.join(unknown)}")
    return hparams_lib.validate(hparams_lib.HParams(**record))


class CheckpointKeeper:
    """Latest-N checkpoints plus the best-by-heldout one; only the writer (rank 0) saves."""

    def __init__(self, logdir, checkpoint, max_to_keep, writer):
        self.logdir = logdir
        self.checkpoint = checkpoint
        self.writer = writer
        self.latest = tf.train.CheckpointManager(checkpoint, logdir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(checkpoint, os.path.join(logdir, BEST_DIR), max_to_keep=1)

    def checkpoints_on_disk(self):
        """Every checkpoint of the directory, newest step first: those the `checkpoint` file
        lists and any other ckpt-STEP files beside them (that file may be lost or stale)."""
        by_step = {step_of(path): path for path in self.latest.checkpoints}
        pattern = re.compile(rf"{re.escape(CHECKPOINT_NAME)}-(\d+)\.(index|data-\d+-of-\d+)")
        for name in os.listdir(self.logdir) if os.path.isdir(self.logdir) else ():
            match = pattern.fullmatch(name)
            if match:
                by_step.setdefault(int(match.group(1)), os.path.join(self.logdir, f"{CHECKPOINT_NAME}-{match.group(1)}"))
        return [by_step[step] for step in sorted(by_step, reverse=True)]

    def restore_latest(self, log):
        """Restores the newest checkpoint that loads on every rank and returns its path, or None
        when there is none. A damaged one (a flipped bit, a truncated or lost file) is named in
        one line through `log` and the one before it is tried; when none loads, the run stops
        (it never starts from scratch over a directory that has checkpoints)."""
        tried = self.checkpoints_on_disk()
        for path in tried:
            failure = self._try_restore(path)
            if distributed.any_rank(failure is not None):
                log(f"warning: {path}: cannot restore ({failure or 'it failed on another rank'}); "
                    "trying the checkpoint before it")
                continue
            return path
        if tried:
            raise CheckpointError(f"{self.logdir}: none of its {len(tried)} checkpoint(s) restores "
                                  f"({', '.join(os.path.basename(path) for path in tried)}); the files are kept as "
                                  "they are: repair them, or train into another --logdir")
        return None

    def _try_restore(self, path):
        """None when `path` restored whole, else its first error line. TensorFlow's warnings of a
        failed restore (values it could not place) are its own business: kept out of the log."""
        if not os.path.exists(path + ".index"):
            return f"its index file {os.path.basename(path)}.index is missing"
        with _tensorflow_warnings_muted():
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return None
            except (tf.errors.OpError, AssertionError, ValueError, IndexError, OSError) as err:
                return first_line(err)  # a truncated file is IndexError ('Read less bytes than requested')
            finally:
                gc.collect()  # the failed restore's bookkeeping warns when collected: here, muted

    def save(self, step):
        """Writes ckpt-STEP. TensorFlow writes the new files first, then points the `checkpoint`
        file at them (an atomic rename), then deletes the oldest: a crash at any moment leaves
        the previous checkpoint restorable. A failed write (full disk, read-only or vanished log
        directory) removes its own partial files and stops the run with one line. A collective
        when the ranks write parts of the tables: every rank calls it."""
        self._save(self.latest, step)

    def _save(self, manager, step):
        previous = manager.latest_checkpoint
        try:
            if self.checkpoint.table_parts > 1:
                self._write_table_parts(manager, step)
            if self.writer:
                manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as err:
            if self.writer:
                self._remove_partial(manager, step)
            kept = f"the previous one, {previous}, is kept" if previous else "there is no earlier checkpoint"
            raise CheckpointError(f"{manager.directory}: saving the checkpoint of step {step} failed "
                                  f"({first_line(err)}); {kept}") from None

    def _write_table_parts(self, manager, step):
        """Every rank's rows of the tables, written beside the checkpoint the writer will merge;
        when one rank's write fails, every rank stops."""
        failure = None
        try:
            self.checkpoint.write_tables_part(os.path.join(manager.directory, f"{CHECKPOINT_NAME}-{step}"),
                                              distributed.rank())
        except (tf.errors.OpError, OSError) as err:
            failure = err
        if distributed.any_rank(failure is not None):
            raise failure or OSError("another rank could not write its rows of the tables")

    @staticmethod
    def _remove_partial(manager, step):
        """Deletes what a failed save of `step` left, unless the checkpoint file already names it."""
        prefix = os.path.join(manager.directory, f"{CHECKPOINT_NAME}-{step}")
        if tf.train.latest_checkpoint(manager.directory) == prefix:
            return
        for leftover in (tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(prefix + "_temp*")
                         + tf.io.gfile.glob(prefix + PARTS_SUFFIX)):
            try:
                tf.io.gfile.rmtree(leftover) if tf.io.gfile.isdir(leftover) else tf.io.gfile.remove(leftover)
            except tf.errors.OpError:
                pass  # the disk refused even this; the checkpoint file still names the previous one

    def best_perplexity(self):
        info = read_best(self.logdir)
        return info["perplexity"] if info else float("inf")

    def save_if_best(self, step, perplexity):
        """Keeps this step under best/ when its heldout perplexity beats the best so far (a
        collective when the ranks write parts of the tables: rank 0 decides for all)."""
        best = self.writer and perplexity < self.best_perplexity()
        if self.checkpoint.table_parts > 1:
            best = distributed.root_decides(best)
        if not best:
            return False
        self._save(self.best, step)
        if not self.writer:
            return True
        path = os.path.join(self.logdir, BEST_DIR, BEST_FILE)
        console.write_atomically(path, json.dumps({"step": step, "perplexity": perplexity}))
        return True


def find_checkpoint(logdir, which="latest"):
    """The path of the latest checkpoint of `logdir`, or of the best one (`which="best"`)."""
    if not os.path.isdir(logdir):
        raise CheckpointError(f"{logdir}: no such log directory")
    directory = os.path.join(logdir, BEST_DIR) if which == "best" else logdir
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        what = "best checkpoint (train with --eval_every, or use the latest)" if which == "best" else "checkpoint"
        raise CheckpointError(f"{directory}: no {what} here")
    return path


def step_of(path):
    """The step of a checkpoint path: CheckpointManager names them PREFIX-STEP."""
    return int(path.rsplit("-", 1)[1])


def read_best(logdir):
    path = os.path.join(logdir, BEST_DIR, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)
