"""What a training run tells its user: the progress line, TensorBoard's scalars, a profiler trace.

Rank 0 alone prints and writes; on the other ranks each of these does nothing.
"""
import functools
import json
import math
import os
import time

import tensorflow as tf

from lm1b_hvd import console
from lm1b_hvd.run import evaluation
from lm1b_hvd.run.logdir_files import PROGRESS_FILE


class Progress:
    """Words and loss since the last log line, and how long the rest of the run will take."""

    def __init__(self, start_step, max_steps=0, max_time=0.0):
        self.start_step, self.max_steps, self.max_time = start_step, max_steps, max_time
        self.started = self.window_start = time.monotonic()
        self.window_words = self.window_loss = 0.0
        self.last = None

    def add(self, stats):
        self.window_words += stats.words
        self.window_loss += stats.loss_sum

    def words_per_sec(self):
        return self.window_words / max(time.monotonic() - self.window_start, 1e-9)

    def out_of_time(self):
        return bool(self.max_time) and time.monotonic() - self.started >= self.max_time

    def line(self, step):
        """The progress line of `step`; starts a new window. `last` keeps its figures."""
        now = time.monotonic()
        elapsed = now - self.started
        eta = None
        if self.max_steps:
            eta = (self.max_steps - step) * elapsed / (step - self.start_step)
        elif self.max_time:
            eta = max(self.max_time - elapsed, 0.0)
        loss = self.window_loss / self.window_words
        self.last = {"step": step, "loss": loss, "words_per_sec": self.words_per_sec(), "elapsed_seconds": elapsed,
                     "eta_seconds": eta, "max_steps": self.max_steps, "max_time": self.max_time,
                     "time": time.time()}
        text = (f"step {step} | loss {loss:.3f} | {self.last['words_per_sec']:,.0f} words/s | "
                f"elapsed {console.format_seconds(elapsed)}")
        if eta is not None:
            text += f" | eta {console.format_seconds(eta)}"
        self.window_start, self.window_words, self.window_loss = now, 0.0, 0.0
        return text


def write_progress_file(logdir, record):
    """The figures of the latest progress line, in L/progress.json, for `lm1b_hvd.status` to read
    while the run goes on elsewhere (replaced whole, never seen half-written)."""
    try:
        console.write_atomically(os.path.join(logdir, PROGRESS_FILE), json.dumps(record))
    except OSError as err:
        raise console.UserError(f"{os.path.join(logdir, PROGRESS_FILE)}: cannot write ({err.strerror})") from None


class Summaries:
    """The run's TensorBoard scalars: train/ after steps, eval/ after heldout evaluations. The
    writers are made on first use, so a run refused at start leaves no new event files."""

    def __init__(self, logdir, writer):
        self.logdir, self.writer = logdir, writer

    def set_writer(self, writer):
        """Whether this process writes (rank 0 does; after an elastic reset another may be rank 0)."""
        self.writer = writer
        for name in ("_train", "_eval"):
            self.__dict__.pop(name, None)

    @functools.cached_property
    def _train(self):
        return self._open("train")

    @functools.cached_property
    def _eval(self):
        return self._open("eval")

    def _open(self, name):
        if not self.writer:
            return tf.summary.create_noop_writer()
        return evaluation.summary_writer(os.path.join(self.logdir, name))

    def training(self, step, stats, words_per_sec, state, ranks):
        """The training scalars of `step`: its StepStats (summed over `ranks` ranks), and the
        weights' norm and learning rate of the run.state.TrainingState."""
        if not self.writer:
            return  # the weight norm is a pass over every weight: only the writing rank pays for it
        model = state.model
        weight_norm = float(tf.linalg.global_norm(model.all_variables))
        loss, lstm_norm = stats.loss_sum / stats.words, stats.lstm_norm / ranks
        with self._train.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", math.exp(min(loss, 50.0)))
            tf.summary.scalar("words_per_sec", words_per_sec)
            tf.summary.scalar("lstm_grad_norm", lstm_norm)
            tf.summary.scalar("clip_scale", min(1.0, model.hps.max_grad_norm / max(lstm_norm, 1e-12)))
            tf.summary.scalar("weight_norm", weight_norm)
            tf.summary.scalar("learning_rate", state.lr_schedule.learning_rate)

    def evaluation(self, step, perplexity):
        evaluation.write_summaries(self._eval, step, perplexity)


class ProfileWindow:
    """A TensorFlow profiler trace of steps first..last (--profile_steps), into L/profile."""

    def __init__(self, logdir, first_last, writer):
        self.directory = os.path.join(logdir, "profile")
        self.first_last = first_last if writer else ()

    def before_step(self, step):
        if self.first_last and step == self.first_last[0]:
            tf.profiler.experimental.start(self.directory)

    def after_step(self, step):
        if self.first_last and step == self.first_last[1]:
            tf.profiler.experimental.stop()
