"""`horovodrun -np N python -m lm1b_hvd.train --datadir D --logdir L [--hpconfig k=v,...]`

Trains the LSTMP language model with one Horovod rank per process. Without
--datadir it trains the `demo` preset on the built-in demo corpus. The log
directory is the unit of resumption: run the same command again to continue.
Rank 0 alone prints, writes summaries and saves checkpoints.
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time

import tensorflow as tf

from lm1b_hvd import checkpoints, console, data, demo_corpus, devices, distributed, evaluation, hparams, vocab
from lm1b_hvd.model import LSTMPLanguageModel
from lm1b_hvd.training import Trainer


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


def _format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Run:
    """One training run: everything `run()` sets up, so the loop itself stays short."""

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
        # Candidate draws and dropout masks: the same on each run of a command, distinct per rank.
        tf.random.set_seed(self.hps.seed * 1000 + self.rank)
        self.vocab = vocab.load(os.path.join(self.datadir, data.VOCAB_FILE))
        checkpoints.check_or_write_hparams(config.logdir, self.hps, len(self.vocab), write=self.is_root)
        self.train_data = data.ShardedDataset.for_rank(self.datadir, "train", self.vocab, self.rank, self.size)
        self.heldout = data.ShardedDataset.for_rank(self.datadir, "heldout", self.vocab, self.rank, self.size)
        self.model = LSTMPLanguageModel(self.hps, len(self.vocab))
        self.trainer = Trainer(self.model)
        self.evaluator = evaluation.Evaluator(self.trainer)
        self.keeper = checkpoints.CheckpointKeeper(
            config.logdir, checkpoints.make_checkpoint(self.trainer), config.keep_checkpoints, self.is_root)
        self.writer = (tf.summary.create_file_writer(os.path.join(config.logdir, "train"))
                       if self.is_root else tf.summary.create_noop_writer())
        self.eval_writer = (tf.summary.create_file_writer(os.path.join(config.logdir, "eval"))
                            if self.is_root else tf.summary.create_noop_writer())

    def log(self, message):
        if self.is_root:
            console.say(message)

    def heldout_perplexity(self):
        """Full-softmax heldout perplexity with the EMA weights (if averaging), summed over ranks.

        A rank whose share holds no sentence adds zeros; only no heldout word at all is an error."""
        sums = self.evaluator.sums(self.heldout, self.config.eval_steps, allow_empty=True)
        loss_sum, words = distributed.sum_over_ranks(tf.constant(sums, tf.float64)).numpy()
        if words <= 0:
            raise data.DataError(f"{self.datadir}: no sentences in the heldout files ({data.HELDOUT_PATTERN})")
        return evaluation.perplexity(loss_sum, words), int(words)

    def evaluate_and_keep_best(self, step):
        value, words = self.heldout_perplexity()
        evaluation.write_summaries(self.eval_writer, step, value)
        best = self.keeper.save_if_best(step, value)
        self.log(f"step {step} | heldout perplexity {value:.2f} over {words} words"
                 f"{' (best so far)' if best else ''}")
        return value

    def write_summaries(self, step, loss, words_per_sec, lstm_norm):
        if not self.is_root:
            return  # the weight norm is a pass over every weight: only the writing rank pays for it
        weight_norm = float(tf.linalg.global_norm(self.model.all_variables))
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", math.exp(min(loss, 50.0)))
            tf.summary.scalar("words_per_sec", words_per_sec)
            tf.summary.scalar("lstm_grad_norm", lstm_norm)
            tf.summary.scalar("clip_scale", min(1.0, self.hps.max_grad_norm / max(lstm_norm, 1e-12)))
            tf.summary.scalar("weight_norm", weight_norm)
            tf.summary.scalar("learning_rate", self.hps.learning_rate)


def run(config):
    """Trains until a limit or a stop signal; returns the final heldout perplexity."""
    r = Run(config)
    hps, trainer = r.hps, r.trainer
    restored = r.keeper.restore_latest()
    start_step = int(trainer.global_step)
    r.log(f"lm1b_hvd: {r.size} rank(s), data {r.datadir}, vocabulary {len(r.vocab)}, logdir {config.logdir}")
    for line in r.device_lines:
        r.log(line)
    r.log(f"hparams: {hps.to_string()}")
    r.log(f"resumed from {restored} at step {start_step}" if restored else "starting from scratch")

    stops = StopSignals()
    batches = data.prefetch(r.train_data.iterate_forever(hps.batch_size, hps.num_steps,
                                                         seed=[hps.seed, r.rank, start_step]))
    state = r.model.zero_state(hps.batch_size)
    log_every = Every(steps=config.log_every)
    summary_every = Every(steps=config.summary_every)
    eval_every = Every(steps=config.eval_every)
    checkpoint_every = Every(steps=config.checkpoint_every_steps, seconds=config.checkpoint_every_secs)
    started = time.monotonic()
    window_start, window_words, window_loss = started, 0.0, 0.0
    step = start_step
    stop_reason = "max_steps" if config.max_steps and step >= config.max_steps else None
    signal_votes = 0.0
    while stop_reason is None:
        if config.profile_steps and step == config.profile_steps[0] and r.is_root:
            tf.profiler.experimental.start(os.path.join(config.logdir, "profile"))
        out_of_time = bool(config.max_time) and time.monotonic() - started >= config.max_time
        stop_votes = tf.constant([float(stops.received is not None), float(out_of_time)])
        x, y, w = next(batches)
        state, stats = trainer.step(x, y, w, state, stop_votes)
        step += 1
        loss_sum, words, norm_sum = stats.loss_sum, stats.words, stats.lstm_norm
        signal_votes, time_votes = stats.signal_votes, stats.time_votes
        loss = loss_sum / words
        if not math.isfinite(loss):
            raise TrainingError(f"training loss is {loss} at step {step}; last checkpoint kept")
        window_words += words
        window_loss += loss_sum
        if config.profile_steps and step == config.profile_steps[1] and r.is_root:
            tf.profiler.experimental.stop()
        if signal_votes > 0:  # every rank takes this branch at the same step
            stop_reason = stops.received or "signal on another rank"
        elif time_votes > 0:
            stop_reason = "max_time"
        elif config.max_steps and step >= config.max_steps:
            stop_reason = "max_steps"
        if summary_every.due(step):
            rate = window_words / max(time.monotonic() - window_start, 1e-9)
            r.write_summaries(step, loss, rate, norm_sum / r.size)
        if log_every.due(step):
            now = time.monotonic()
            rate = window_words / max(now - window_start, 1e-9)
            eta = ""
            if config.max_steps:
                eta = f" | eta {_format_seconds((config.max_steps - step) * (now - started) / (step - start_step))}"
            elif config.max_time:
                eta = f" | eta {_format_seconds(max(config.max_time - (now - started), 0))}"
            r.log(f"step {step} | loss {window_loss / window_words:.3f} | {rate:,.0f} words/s "
                  f"| elapsed {_format_seconds(now - started)}{eta}")
            window_start, window_words, window_loss = now, 0.0, 0.0
        if step == start_step + 1:
            distributed.broadcast_from_root(trainer.state_variables())
        if stop_reason is None and config.eval_every and eval_every.due(step):
            r.evaluate_and_keep_best(step)
        if stop_reason is None and checkpoint_every.due(step):
            r.keeper.save(step)

    r.keeper.save(step)
    r.log(f"stopped at step {step} ({stop_reason}); checkpoint saved in {config.logdir}")
    if signal_votes > 0:
        return None  # the scheduler's deadline is near: no final evaluation
    final = r.evaluate_and_keep_best(step)
    oracle = demo_corpus.read_oracle(r.datadir)
    if oracle:
        gap = 100.0 * (final / oracle["oracle_perplexity"] - 1.0)
        r.log(f"eval perplexity {final:.2f} | oracle perplexity {oracle['oracle_perplexity']:.2f} "
              f"({gap:+.1f}%)")
    best = checkpoints.read_best(config.logdir)
    if best:
        r.log(f"best heldout perplexity {best['perplexity']:.2f} at step {best['step']} "
              f"(checkpoint in {os.path.join(config.logdir, checkpoints.BEST_DIR)})")
    return final


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        profile_steps=profile, allow_cpu=args.allow_cpu)


def main(argv=None):
    config = parse_args(argv)
    return console.run_main(lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
