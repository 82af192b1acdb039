"""The log directory's files: the checkpoints (the latest N, the best one, the fallback past a
damaged one) and the hparams record a resume must agree with. What a checkpoint holds is
run.state's.

Layout of a log directory:
  hparams.json          the record the run started with; a resume must agree on model shapes
  ckpt-STEP.*, checkpoint   the latest checkpoints (run.state.TrainingState: the run continues exactly)
  best/ckpt-STEP.*, best/best.json   the checkpoint with the lowest heldout perplexity so far
  train/, eval/         TensorBoard event files of the trainer (and eval_*/ of evaluate.py)
  run.lock              held by rank 0 of the run that owns the directory (run.lock)
  progress.json         the latest progress line's figures, for lm1b_hvd.status
"""
import contextlib
import gc
import json
import logging
import os
import re
import typing

import tensorflow as tf

from lm1b_hvd import console, hparams as hparams_lib, pinned_stack
from lm1b_hvd.model.pieces import PARTS_SUFFIX
from lm1b_hvd.ranks import ONE_PROCESS
from lm1b_hvd.run.logdir_files import BEST_DIR, BEST_FILE, HPARAMS_FILE
from lm1b_hvd.run.position import RunPoint

CHECKPOINT_NAME = "ckpt"  # tf.train.CheckpointManager's default prefix


class CheckpointError(console.UserError):
    """A log directory that cannot be resumed with the requested settings."""


class CheckpointParts(typing.NamedTuple):
    """How a checkpoint's tables are written before they are merged: in `count` parts (1: rank
    0 writes them all), of which this rank writes part `mine` (None: none), holding the pieces
    `writes(piece)` says (None: those it holds alone, and part 0 those every rank holds)."""
    count: int = 1
    mine: int = None
    writes: typing.Callable = None


class RunCheckpoints:
    """A training run's checkpoints of its run.state.TrainingState, which rank 0 writes; every
    rank's RunPoint rides in them. `parts` (the sync mode's run.modes.CheckpointParts): when
    the tables are written in parts, each rank writes its own first (vocabulary-parallel, every
    rank its rows; two-level, the first node's ranks their rows of the outer momentum), into the
    log directory, which must be on a filesystem every node sees, as a cluster's is."""

    def __init__(self, logdir, state, keep, ranks, parts):
        self.state, self.ranks = state, ranks
        self.keeper = CheckpointKeeper(logdir, state, keep, ranks, parts)

    def restore(self, log, announce_new_run=True):
        """The RunPoint to start from: the latest checkpoint's, exactly, when it was written by as
        many ranks with the same batch and seed; else its weights from the start of the data;
        without a checkpoint, step 0. Says which in one line through `log` (a new run only if
        `announce_new_run`: one that --init_from starts says so itself), and what the records
        beside the run position said as they loaded."""
        path = self.keeper.restore_latest(log)
        if not path:
            if announce_new_run:
                log("starting from scratch")
            return RunPoint.start(int(self.state.step), self.state.model)
        point, unusable, notes = self.state.restored_point(self.ranks)
        if unusable:
            log(f"resumed from {path} at step {point.step}; {unusable}: the data order restarts "
                "and the LSTM rows start from zero")
        else:
            log(f"resumed from {path} at step {point.step} (epoch {point.position.epoch}, the same data position "
                "and LSTM rows)")
        for note in notes:
            log(note)
        return point

    def any_on_disk(self):
        """Whether the log directory holds a checkpoint: a restore will resume, not start."""
        return bool(self.keeper.checkpoints_on_disk())

    def save(self, point):
        self.state.record_every_rank(point, self.ranks)
        self.keeper.save(point.step)

    def save_if_best(self, point, perplexity):
        """Keeps `point` under best/ when `perplexity` beats the best so far; whether it did."""
        self.state.record_every_rank(point, self.ranks)
        return self.keeper.save_if_best(point.step, perplexity)


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
    """Latest-N checkpoints of `state` plus the best-by-heldout one; only rank 0 saves, after
    the ranks wrote their parts of the tables when there are several (`parts`, CheckpointParts)."""

    def __init__(self, logdir, state, max_to_keep, ranks=ONE_PROCESS, parts=CheckpointParts()):
        self.logdir, self.state, self.ranks, self.parts = logdir, state, ranks, parts
        target = pinned_stack.ManagedWrite(lambda prefix: state.write(prefix, parts.count), state.save_counter)
        self.latest = tf.train.CheckpointManager(target, logdir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(target, os.path.join(logdir, BEST_DIR), max_to_keep=1)

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
            if self.ranks.any(failure is not None):
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
                self.state.restore(path)
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
            if self.parts.count > 1:
                self._write_table_parts(manager, step)
            if self.ranks.is_root:
                manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as err:
            if self.ranks.is_root:
                self._remove_partial(manager, step)
            kept = f"the previous one, {previous}, is kept" if previous else "there is no earlier checkpoint"
            raise CheckpointError(f"{manager.directory}: saving the checkpoint of step {step} failed "
                                  f"({first_line(err)}); {kept}") from None

    def _write_table_parts(self, manager, step):
        """The ranks' parts of the tables, written beside the checkpoint the writer will merge;
        when one rank's write fails, every rank stops."""
        failure = None
        try:
            if self.parts.mine is not None:
                self.state.write_tables_part(os.path.join(manager.directory, f"{CHECKPOINT_NAME}-{step}"),
                                             self.parts.mine, self.parts.writes)
        except (tf.errors.OpError, OSError) as err:
            failure = err
        if self.ranks.any(failure is not None):
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
        best = self.ranks.is_root and perplexity < self.best_perplexity()
        if self.parts.count > 1:
            best = self.ranks.root_decides(best)
        if not best:
            return False
        self._save(self.best, step)
        if not self.ranks.is_root:
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
