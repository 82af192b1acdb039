"""`horovodrun -np N python -m lm1b_hvd.train --datadir D --logdir L [--hpconfig k=v,...]`

Trains the LSTMP language model with one Horovod rank per process. Without
--datadir it trains the `demo` preset on the built-in demo corpus. The log
directory is the unit of resumption: run the same command again to continue.
Rank 0 alone prints, writes summaries and saves checkpoints.
"""
import dataclasses
import functools
import math
import os
import signal
import sys
import time

import tensorflow as tf

from lm1b_hvd import checkpoints, console, data, demo_corpus, devices, distributed, evaluation, hparams, vocab
from lm1b_hvd.model import LSTMPLanguageModel
from lm1b_hvd.training import Trainer, Votes


DEMO_MINUTES = 3


class TrainingError(console.UserError):
    """A run that must stop (non-finite loss, unusable inputs)."""


@dataclasses.dataclass
class TrainConfig:
    logdir: str
    datadir: str = ""  # empty: the demo corpus
    preset: str = "default"
    hpconfig: str = ""
    max_steps: int = 0  # 0: no limit
    max_time: float = 0.0  # seconds; 0: no limit
    log_every: int = 100
    summary_every: int = 20
    eval_every: int = 0  # steps; 0: only at the end
    eval_steps: int = 0  # heldout batches per rank per evaluation; 0: the whole heldout share
    checkpoint_every_secs: float = 600.0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 5
    profile_steps: tuple = ()  # (first, last) step of a TF profiler trace
    allow_cpu: bool = False  # train on the CPU even when the job was given GPUs
    elastic: bool = False  # Horovod elastic mode (horovodrun --min-np/--max-np, Gloo)
    commit_steps: int = 100  # elastic: steps between commits of the state to host memory


class Every:
    """Decides when a periodic action (log, summary, eval, checkpoint) is due."""

    def __init__(self, steps=0, seconds=0.0):
        self.steps, self.seconds = steps, seconds
        self.last_time = time.monotonic()

    def due(self, step):
        now = time.monotonic()
        if (self.steps and step % self.steps == 0) or (self.seconds and now - self.last_time >= self.seconds):
            self.last_time = now
            return True
        return False


class StopSignals:
    """SIGUSR1/SIGTERM (Slurm's warning before the time limit) ask for a checkpoint and a clean stop."""

    def __init__(self):
        self.received = None
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name


def stop_reason(stats, step, max_steps, received_signal):
    """Why the run stops after this step, or None. The votes in `stats` are summed over ranks,
    so every rank reaches the same answer at the same step."""
    if stats.signal_votes > 0:
        return received_signal or "signal on another rank"
    if stats.time_votes > 0:
        return "max_time"
    if max_steps and step >= max_steps:
        return "max_steps"
    return None


class Progress:
    """Words and loss since the last log line, and how long the rest of the run will take."""

    def __init__(self, start_step, config):
        self.start_step, self.config = start_step, config
        self.started = self.window_start = time.monotonic()
        self.window_words = self.window_loss = 0.0

    def add(self, stats):
        self.window_words += stats.words
        self.window_loss += stats.loss_sum

    def words_per_sec(self):
        return self.window_words / max(time.monotonic() - self.window_start, 1e-9)

    def out_of_time(self):
        return bool(self.config.max_time) and time.monotonic() - self.started >= self.config.max_time

    def line(self, step):
        """The progress line of `step`; starts a new window."""
        now = time.monotonic()
        elapsed = now - self.started
        eta = ""
        if self.config.max_steps:
            eta = f" | eta {console.format_seconds((self.config.max_steps - step) * elapsed / (step - self.start_step))}"
        elif self.config.max_time:
            eta = f" | eta {console.format_seconds(max(self.config.max_time - elapsed, 0))}"
        text = (f"step {step} | loss {self.window_loss / self.window_words:.3f} | {self.words_per_sec():,.0f} "
                f"words/s | elapsed {console.format_seconds(elapsed)}{eta}")
        self.window_start, self.window_words, self.window_loss = now, 0.0, 0.0
        return text


class Run:
    """One training run: everything `run()` sets up and calls, so the loop itself stays short."""

    def __init__(self, config):
        distributed.init()
        devices.check_gpus_used(config.allow_cpu)
        self.config = config
        self.rank, self.size = distributed.rank(), distributed.size()
        self.is_root = distributed.is_root()
        self.device_lines = distributed.device_report(devices.describe(distributed.cores_per_rank()),
                                                      devices.on_gpu())
        self.datadir = config.datadir or demo_corpus.ensure_demo_corpus()
        self.hps = hparams.build(config.preset, config.hpconfig)
        self.vocab = vocab.load(os.path.join(self.datadir, data.VOCAB_FILE))
        checkpoints.check_or_write_hparams(config.logdir, self.hps, len(self.vocab), write=self.is_root)
        self.train_data, self.heldout = self._data_shares()
        self.model = LSTMPLanguageModel(self.hps, len(self.vocab))
        self.trainer = Trainer(self.model)
        self.evaluator = evaluation.Evaluator(self.model, self.trainer.ema, report=self.log)
        self.run_position = checkpoints.RunPosition()
        self.signals = StopSignals()
        self.keeper = checkpoints.CheckpointKeeper(
            config.logdir, checkpoints.make_checkpoint(self.trainer, self.run_position), config.keep_checkpoints,
            self.is_root)

    def log(self, message):
        if self.is_root:
            console.say(message)

    def _data_shares(self):
        return tuple(data.ShardedDataset.for_rank(self.datadir, split, self.vocab, self.rank, self.size)
                     for split in ("train", "heldout"))

    def reshard(self):
        """After an elastic reset: this process's new rank, its new share of the data, a step
        traced for the new ranks, and the writing role if it is rank 0 now."""
        self.rank, self.size, self.is_root = distributed.rank(), distributed.size(), distributed.is_root()
        self.train_data, self.heldout = self._data_shares()
        self.trainer.retrace()
        self.keeper.writer = self.is_root
        for name in ("writer", "eval_writer"):
            self.__dict__.pop(name, None)

    # Summary writers are made on first use: a run refused at start leaves no new event files.
    @functools.cached_property
    def writer(self):
        return self._summary_writer("train")

    @functools.cached_property
    def eval_writer(self):
        return self._summary_writer("eval")

    def _summary_writer(self, name):
        if not self.is_root:
            return tf.summary.create_noop_writer()
        return evaluation.summary_writer(os.path.join(self.config.logdir, name))

    def restore(self):
        """(step, data position, row state) to start from: the latest checkpoint's, exactly, when
        it was written by as many ranks with the same batch and seed; else its weights alone."""
        path = self.keeper.restore_latest()
        step = int(self.trainer.global_step)
        position, state = data.StreamPosition(), self.model.zero_state(self.hps.batch_size)
        if not path:
            self.log("starting from scratch")
            return step, position, state
        saved = self.run_position.for_rank(self.rank, self.size, self.hps.seed, self.hps.batch_size)
        if saved.unusable:
            self.log(f"resumed from {path} at step {step}; {saved.unusable}: the data order restarts "
                     "and the LSTM rows start from zero")
            return step, position, state
        position = data.StreamPosition.from_dict(saved.stream)
        self.log(f"resumed from {path} at step {step} (epoch {position.epoch}, the same data position "
                 "and LSTM rows)")
        return step, position, self.model.state_from_array(saved.row_state)

    def training_batches(self, position):
        return data.prefetch(self.train_data.iterate_forever(
            self.hps.batch_size, self.hps.num_steps, seed=[self.hps.seed, self.rank], position=position))

    def record_position(self, position, state):
        """Every rank's data position and LSTM rows, into the checkpoint rank 0 will write."""
        entries = distributed.gather_objects((position.to_dict(), self.model.state_to_array(state)))
        if self.is_root:
            self.run_position.store(self.hps.seed, self.hps.batch_size, [entry[0] for entry in entries],
                                    [entry[1] for entry in entries])

    def save(self, step, position, state):
        self.record_position(position, state)
        self.keeper.save(step)

    def check_finite(self, stats, step):
        loss = stats.loss_sum / stats.words
        if not math.isfinite(loss):
            raise TrainingError(f"training loss is {loss} at step {step}; last checkpoint kept")

    def evaluate_and_keep_best(self, step, position, state):
        value, words = self.evaluator.perplexity_over_ranks(self.heldout, self.config.eval_steps)
        evaluation.write_summaries(self.eval_writer, step, value)
        self.record_position(position, state)
        best = self.keeper.save_if_best(step, value)
        self.log(f"step {step} | heldout perplexity {value:.2f} over {words} words"
                 f"{' (best so far)' if best else ''}")
        return value

    def write_summaries(self, step, stats, words_per_sec):
        if not self.is_root:
            return  # the weight norm is a pass over every weight: only the writing rank pays for it
        weight_norm = float(tf.linalg.global_norm(self.model.all_variables))
        loss, lstm_norm = stats.loss_sum / stats.words, stats.lstm_norm / self.size
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", math.exp(min(loss, 50.0)))
            tf.summary.scalar("words_per_sec", words_per_sec)
            tf.summary.scalar("lstm_grad_norm", lstm_norm)
            tf.summary.scalar("clip_scale", min(1.0, self.hps.max_grad_norm / max(lstm_norm, 1e-12)))
            tf.summary.scalar("weight_norm", weight_norm)
            tf.summary.scalar("learning_rate", self.hps.learning_rate)

    def profile(self, step, before):
        """Starts the TF profiler before the first step of --profile_steps, stops it after the last."""
        first_last = self.config.profile_steps
        if not first_last or not self.is_root:
            return
        if before and step == first_last[0]:
            tf.profiler.experimental.start(os.path.join(self.config.logdir, "profile"))
        elif not before and step == first_last[1]:
            tf.profiler.experimental.stop()

    def finish(self, step, reason, position, state):
        """The final heldout evaluation and the summary lines; none after a signal (the deadline is near)."""
        self.log(f"stopped at step {step} ({reason}); checkpoint saved in {self.config.logdir}")
        if reason.startswith("SIG") or reason == "signal on another rank":
            return None
        final = self.evaluate_and_keep_best(step, position, state)
        oracle = demo_corpus.read_oracle(self.datadir)
        if oracle:
            gap = 100.0 * (final / oracle["oracle_perplexity"] - 1.0)
            self.log(f"eval perplexity {final:.2f} | oracle perplexity {oracle['oracle_perplexity']:.2f} "
                     f"({gap:+.1f}%)")
        best = checkpoints.read_best(self.config.logdir)
        if best:
            self.log(f"best heldout perplexity {best['perplexity']:.2f} at step {best['step']} "
                     f"(checkpoint in {os.path.join(self.config.logdir, checkpoints.BEST_DIR)})")
        return final


def train_steps(r, config, step, position, state, commit=None):
    """The training loop from `step`; returns where it stopped: (step, reason, position, state).
    Elastic runs pass `commit`, called every --commit_steps steps."""
    start_step = step
    batches = r.training_batches(position)
    progress = Progress(start_step, config)
    log_every, summary_every = Every(steps=config.log_every), Every(steps=config.summary_every)
    eval_every, commit_every = Every(steps=config.eval_every), Every(steps=config.commit_steps if commit else 0)
    checkpoint_steps, checkpoint_clock = Every(steps=config.checkpoint_every_steps), Every(
        seconds=config.checkpoint_every_secs)
    reason = "max_steps" if config.max_steps and step >= config.max_steps else None

    while reason is None:
        # step: the batch, each rank's requests, the update
        x, y, w, next_position = next(batches)
        votes = Votes(stop_signal=r.signals.received is not None, out_of_time=progress.out_of_time(),
                      checkpoint=r.is_root and checkpoint_clock.due(step))
        r.profile(step, before=True)
        state, stats = r.trainer.step(x, y, w, state, votes)
        step, position = step + 1, next_position
        r.profile(step, before=False)
        r.check_finite(stats, step)
        if step == start_step + 1:
            distributed.broadcast_from_root(r.trainer.state_variables())

        # stop?
        reason = stop_reason(stats, step, config.max_steps, r.signals.received)

        # report
        progress.add(stats)
        if summary_every.due(step):
            r.write_summaries(step, stats, progress.words_per_sec())
        if log_every.due(step):
            r.log(progress.line(step))

        # evaluate
        if reason is None and eval_every.due(step):
            r.evaluate_and_keep_best(step, position, state)

        # checkpoint, and the elastic commit
        if reason is None and (checkpoint_steps.due(step) or stats.checkpoint_votes > 0):
            r.save(step, position, state)
        if reason is None and commit_every.due(step):
            commit()

    r.save(step, position, state)
    return step, reason, position, state


def train_elastic(r, config, step, position, state):
    """--elastic: Horovod's elastic mode. Every --commit_steps the weights, slots and step are
    copied to host memory; when a rank is lost the survivors go back to that commit, take new
    ranks and new shares of the data (each share's order restarts, LSTM rows from zero) and go
    on: the effective batch becomes (ranks left) x batch_size sentences, the per-rank update is
    unchanged. Ranks that join later get rank 0's weights the same way."""
    start = {"position": position, "state": state}
    elastic_state = distributed.ElasticState(r.trainer.state_variables())

    def after_reset():
        r.reshard()
        start["position"], start["state"] = data.StreamPosition(), r.model.zero_state(r.hps.batch_size)
        r.log(f"elastic reset: {r.size} rank(s) from the commit at step {int(r.trainer.global_step)}; "
              f"data re-sharded, LSTM rows from zero, effective batch {r.size} x {r.hps.batch_size} sentences")

    elastic_state.register_reset_callbacks([after_reset])

    @distributed.elastic_run
    def train(elastic):
        return train_steps(r, config, int(r.trainer.global_step), start["position"], start["state"],
                           commit=elastic.commit)

    return train(elastic_state)


def run(config):
    """Trains until a limit or a stop signal; returns the final heldout perplexity."""
    r = Run(config)
    r.log(f"lm1b_hvd: {r.size} rank(s), data {r.datadir}, vocabulary {len(r.vocab)}, logdir {config.logdir}")
    for line in r.device_lines:
        r.log(line)
    r.log(f"hparams: {r.hps.to_string()}")
    step, position, state = r.restore()
    if config.elastic:
        step, reason, position, state = train_elastic(r, config, step, position, state)
    else:
        step, reason, position, state = train_steps(r, config, step, position, state)
    return r.finish(step, reason, position, state)


def parse_args(argv):
    parser = console.ArgumentParser(__doc__)
    parser.add_argument("--datadir", default="", help="lm1b layout with 1b_word_vocab.txt; default: demo corpus")
    parser.add_argument("--logdir", default="", help="checkpoints and summaries; default: runs/<preset>")
    parser.add_argument("--preset", default=None, choices=sorted(hparams.PRESETS),
                        help="default: 'demo' without --datadir, else 'default'")
    parser.add_argument("--hpconfig", default="", help="overrides, e.g. num_layers=2,state_size=4096")
    parser.add_argument("--max_steps", type=int, default=0)
    parser.add_argument("--max_time", type=float, default=0.0,
                        help=f"seconds of training (without --datadir or a limit: {DEMO_MINUTES} minutes)")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--summary_every", type=int, default=20)
    parser.add_argument("--eval_every", type=int, default=0, help="steps between heldout evaluations")
    parser.add_argument("--eval_steps", type=int, default=0, help="heldout batches per rank; 0: all")
    parser.add_argument("--checkpoint_secs", type=float, default=600.0)
    parser.add_argument("--checkpoint_steps", type=int, default=0)
    parser.add_argument("--keep_checkpoints", type=int, default=5)
    parser.add_argument("--profile_steps", default="", help="FIRST,LAST: TF profiler trace of these steps")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="train on the CPU even if the job was given GPUs that TensorFlow cannot see")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod elastic mode: go on when ranks are lost or added (horovodrun --min-np ...)")
    parser.add_argument("--commit_steps", type=int, default=100,
                        help="elastic: steps between commits (what a lost rank costs the others)")
    args = parser.parse_args(argv)
    preset = args.preset or ("default" if args.datadir else "demo")
    if not args.datadir and not (args.max_steps or args.max_time):
        args.max_time = DEMO_MINUTES * 60.0  # the demo is a few minutes, not an endless run
    profile = ()
    if args.profile_steps:
        try:
            first, last = (int(v) for v in args.profile_steps.split(","))
        except ValueError:
            parser.error(f"--profile_steps expects FIRST,LAST, got '{args.profile_steps}'")
        profile = (first, last)
    return TrainConfig(
        logdir=args.logdir or os.path.join("runs", preset), datadir=args.datadir, preset=preset,
        hpconfig=args.hpconfig, max_steps=args.max_steps, max_time=args.max_time,
        log_every=args.log_every, summary_every=args.summary_every, eval_every=args.eval_every,
        eval_steps=args.eval_steps, checkpoint_every_secs=args.checkpoint_secs,
        checkpoint_every_steps=args.checkpoint_steps, keep_checkpoints=args.keep_checkpoints,
        profile_steps=profile, allow_cpu=args.allow_cpu, elastic=args.elastic, commit_steps=args.commit_steps)


def main(argv=None):
    config = parse_args(argv)
    return console.run_main(lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
