"""`horovodrun -np N python -m lm1b_hvd.train --datadir D --logdir L [--hpconfig k=v,...]`

Trains the LSTMP language model with one Horovod rank per process. Without
--datadir it trains the `demo` preset on the built-in demo corpus for a few
minutes. The log directory is the unit of resumption: run the same command
again to continue. Rank 0 alone prints, writes summaries and saves checkpoints.

Examples:
  horovodrun -np 2 python -m lm1b_hvd.train
  horovodrun -np 8 python -m lm1b_hvd.train --datadir /data/lm1b --logdir runs/lstm-2048-512 --eval_every 5000
  horovodrun -np 2 python -m lm1b_hvd.train --datadir my_corpus --preset corpus --max_time 900 --eval_every 500
  python -m lm1b_hvd.train --preset demo --hpconfig kernels=portable,keep_prob=0.9 --max_steps 300
"""
import argparse
import dataclasses
import enum
import math
import os
import sys
import time

from lm1b_hvd import (checkpoints, console, data, demo_corpus, devices, distributed, evaluation, hparams,
                      reporting, run_lock, stop_requests, vocab, watchdog)
from lm1b_hvd.checkpoints import RunPoint
from lm1b_hvd.console import option
from lm1b_hvd.model import LSTMPLanguageModel
from lm1b_hvd.training import Trainer, Votes

DEMO_MINUTES = 3


def _first_last(text):
    try:
        first, last = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects FIRST,LAST, got '{text}'") from None
    if not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"expects FIRST,LAST with 0 <= FIRST <= LAST, got '{text}'")
    return first, last


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run's settings: each field is the flag --FIELD of the same name and default."""
    datadir: str = option("", "lm1b layout with 1b_word_vocab.txt; empty: the built-in demo corpus")
    logdir: str = option("", "checkpoints and summaries; empty: runs/<preset>")
    preset: str = option("", "hparams preset; empty: 'demo' without --datadir, else 'default'",
                         choices=sorted(hparams.PRESETS))
    hpconfig: str = option("", "hparams overrides k=v,k=v, e.g. num_layers=2,state_size=4096")
    max_steps: int = option(0, "stop after this step; 0: no limit", minimum=0)
    max_time: float = option(0.0, f"seconds of training; 0: no limit (without --datadir and --max_steps: "
                                  f"{DEMO_MINUTES} minutes)", minimum=0.0)
    log_every: int = option(100, "steps between progress lines", minimum=1)
    summary_every: int = option(20, "steps between TensorBoard training scalars", minimum=1)
    eval_every: int = option(0, "steps between heldout evaluations (each keeps the best checkpoint); "
                                "0: only at the end", minimum=0)
    eval_steps: int = option(0, "heldout batches per rank per evaluation; 0: the rank's whole share", minimum=0)
    checkpoint_secs: float = option(600.0, "seconds between checkpoints; 0: none by the clock", minimum=0.0)
    checkpoint_steps: int = option(0, "steps between checkpoints, besides the clock; 0: by the clock only",
                                   minimum=0)
    keep_checkpoints: int = option(5, "latest checkpoints kept (the best one is kept apart)", minimum=1)
    profile_steps: tuple = option((), "FIRST,LAST: a TensorFlow profiler trace of these steps in L/profile",
                                  type=_first_last, metavar="FIRST,LAST")
    allow_cpu: bool = option(False, "train on the CPU even if the job was given GPUs that TensorFlow cannot see")
    elastic: bool = option(False, "Horovod elastic mode: go on when ranks are lost or added "
                                  "(horovodrun --min-np/--max-np, Gloo)")
    commit_steps: int = option(100, "elastic: steps between commits of the state to host memory "
                                    "(what a lost rank costs the others)", minimum=1)
    step_timeout: float = option(0.0, "seconds without a completed step after which every live rank exits "
                                      f"(status {watchdog.EXIT_STALLED}); 0: {watchdog.STEP_FACTOR:.0f}x the slowest "
                                      f"recent step, at least {watchdog.FLOOR_SECONDS:.0f} s, more around checkpoints "
                                      "and evaluations", minimum=0.0)


class StopReason(enum.Enum):
    MAX_STEPS = "max_steps"
    MAX_TIME = "max_time"
    SIGNAL = "signal"  # a signal to this rank, or its launcher's end (stop_requests)
    SIGNAL_ON_ANOTHER_RANK = "stop request on another rank"

    @property
    def by_signal(self):
        return self in (StopReason.SIGNAL, StopReason.SIGNAL_ON_ANOTHER_RANK)


class TrainingError(console.UserError):
    """A run that must stop (non-finite loss, unusable inputs)."""


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


def stop_reason(stats, step, max_steps, signal_here):
    """The StopReason after this step, or None. The votes in `stats` are summed over ranks, so
    every rank reaches the same answer at the same step; a signal on any rank comes first."""
    if stats.stop_signal > 0:
        return StopReason.SIGNAL if signal_here else StopReason.SIGNAL_ON_ANOTHER_RANK
    if stats.out_of_time > 0:
        return StopReason.MAX_TIME
    if max_steps and step >= max_steps:
        return StopReason.MAX_STEPS
    return None


def check_finite(stats, step):
    loss = stats.loss_sum / stats.words
    if not math.isfinite(loss):
        raise TrainingError(f"training loss is {loss} at step {step}; last checkpoint kept")


class Run:
    """What one training run is made of, set up once: the data shares of this rank, the model and
    its trainer, the evaluator, the checkpoints and the reports. The loop (train_steps) calls it."""

    def __init__(self, config):
        distributed.init(stall_warning_seconds=watchdog.stall_warning_seconds(config.step_timeout))
        devices.check_gpus_used(config.allow_cpu)
        self.config = config
        self.is_root = distributed.is_root()
        self.lock = run_lock.RunLock(config.logdir)
        self.datadir = config.datadir or demo_corpus.ensure_demo_corpus()
        data.check_datadir(self.datadir)
        self.hps = hparams.build(config.preset, config.hpconfig)
        self.vocab = vocab.load(os.path.join(self.datadir, data.VOCAB_FILE))
        if self.hps.vocab_parallel and config.elastic:
            raise console.UserError("--elastic cannot be used with vocab_parallel=true: an elastic reset would have "
                                    "to re-shard the vocabulary's rows over the new ranks, which this trainer does not "
                                    "do; drop one of the two")
        exchange = distributed.vocab_exchange(self.hps, len(self.vocab))
        self._take_logdir()  # after the checks that only read, before the first write
        checkpoints.check_or_write_hparams(config.logdir, self.hps, len(self.vocab), write=self.is_root)
        self.train_data, self.heldout = self._data_shares()
        self.model = LSTMPLanguageModel(self.hps, len(self.vocab), vocab_exchange=exchange)
        self.trainer = Trainer(self.model)
        self.evaluator = evaluation.Evaluator(self.model, self.trainer.ema, report=self.log)
        self.checkpoints = checkpoints.RunCheckpoints(config.logdir, self.trainer, config.keep_checkpoints,
                                                      self.is_root)
        self.summaries = reporting.Summaries(config.logdir, self.is_root)
        self.profile = reporting.ProfileWindow(config.logdir, config.profile_steps, self.is_root)
        self.stop_requests = stop_requests.StopRequests()
        self.watchdog = watchdog.StepWatchdog(distributed.rank(), config.step_timeout)

    def log(self, message):
        if self.is_root:
            console.say(message)

    def report_progress(self, progress, step):
        """The progress line of `step`, and its figures in L/progress.json for lm1b_hvd.status."""
        self.log(progress.line(step))
        if self.is_root:
            reporting.write_progress_file(self.config.logdir, progress.last)

    def _take_logdir(self):
        """Rank 0 takes the log directory's lock before anything is written there; when it
        cannot, every rank stops (rank 0 says why)."""
        refusal = None
        if self.is_root:
            try:
                self.lock.acquire()
            except console.UserError as err:
                refusal = str(err)
        refusal = distributed.root_decides(refusal)
        if refusal:
            raise console.UserError(refusal) if self.is_root else console.SaidByRankZero()

    def log_start(self):
        """What the run is: ranks, data, devices (a collective: every rank calls it), hparams, plan."""
        self.log(f"lm1b_hvd: {distributed.size()} rank(s), data {self.datadir}, vocabulary {len(self.vocab)}, "
                 f"logdir {self.config.logdir}")
        for line in distributed.device_report(devices.describe(distributed.cores_per_rank()), devices.on_gpu()):
            self.log(line)
        self.log(f"hparams: {self.hps.to_string()}")
        self.log(self.model.plan.describe())

    def _data_shares(self):
        rank, size = distributed.rank(), distributed.size()
        return tuple(data.ShardedDataset.for_rank(self.datadir, split, self.vocab, rank, size)
                     for split in ("train", "heldout"))

    def reshard(self):
        """After an elastic reset: this process's new share of the data, a step traced for the new
        ranks, and the writing role if it is rank 0 now."""
        self.is_root = distributed.is_root()
        if self.is_root:
            self.lock.acquire()
        else:
            self.lock.release()
        self.train_data, self.heldout = self._data_shares()
        self.trainer.retrace()
        self.checkpoints.set_writer(self.is_root)
        self.summaries.set_writer(self.is_root)

    def training_batches(self, position):
        return data.prefetch(self.train_data.iterate_forever(
            self.hps.batch_size, self.hps.num_steps, seed=[self.hps.seed, distributed.rank()], position=position))

    def save_checkpoint(self, point):
        with self.watchdog.activity("checkpoint", f"the checkpoint of step {point.step}"):
            self.checkpoints.save(point)

    def evaluate(self, point):
        """The heldout perplexity at `point`, in TensorBoard and the log; its checkpoint kept if best."""
        with self.watchdog.activity("evaluation", f"the heldout evaluation of step {point.step}"):
            value, words = self.evaluator.perplexity_over_ranks(self.heldout, self.config.eval_steps)
            self.summaries.evaluation(point.step, value)
            best = self.checkpoints.save_if_best(point, value)
        self.log(f"step {point.step} | heldout perplexity {value:.2f} over {words} words"
                 f"{' (best so far)' if best else ''}")
        decayed = self.trainer.lr_schedule.after_evaluation(value)
        if decayed:
            self.log(f"step {point.step} | {decayed}")
        return value

    def finish(self, point, reason):
        """The final heldout evaluation and the summary lines; none after a signal (the deadline is near)."""
        said = self.stop_requests.pending() if reason is StopReason.SIGNAL else reason.value
        self.log(f"stopped at step {point.step} ({said}); checkpoint saved in {self.config.logdir}")
        if reason.by_signal:
            return None
        final = self.evaluate(point)
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


def train_steps(r, config, point, commit=None):
    """The training loop from `point` (a RunPoint); returns (the RunPoint where it stopped, the
    StopReason). Elastic runs pass `commit`, called every --commit_steps steps."""
    start_step = point.step
    batches = r.training_batches(point.position)
    progress = reporting.Progress(start_step, config.max_steps, config.max_time)
    log_every, summary_every, eval_every = (Every(steps=config.log_every), Every(steps=config.summary_every),
                                            Every(steps=config.eval_every))
    checkpoint_every, checkpoint_clock = Every(steps=config.checkpoint_steps), Every(seconds=config.checkpoint_secs)
    commit_every = Every(steps=config.commit_steps if commit else 0)
    reason = StopReason.MAX_STEPS if config.max_steps and point.step >= config.max_steps else None
    r.watchdog.start(point.step)

    while reason is None:
        # step: the batch, each rank's requests, the update
        x, y, w, next_position = next(batches)
        stop_here = r.stop_requests.pending() is not None
        votes = Votes(stop_signal=stop_here, out_of_time=progress.out_of_time(),
                      checkpoint=r.is_root and checkpoint_clock.due(point.step))
        r.profile.before_step(point.step)
        row_state, stats = r.trainer.step(x, y, w, point.row_state, votes)
        point = RunPoint(point.step + 1, next_position, row_state)
        r.profile.after_step(point.step)
        check_finite(stats, point.step)
        if point.step == start_step + 1:
            distributed.broadcast_from_root(r.trainer.state_variables())
        r.watchdog.beat(point.step)

        # stop?
        reason = stop_reason(stats, point.step, config.max_steps, signal_here=stop_here)

        # report
        progress.add(stats)
        if summary_every.due(point.step):
            r.summaries.training(point.step, stats, progress.words_per_sec(), r.model, distributed.size(),
                                 r.trainer.lr_schedule.learning_rate)
        if log_every.due(point.step):
            r.report_progress(progress, point.step)

        # evaluate
        if reason is None and eval_every.due(point.step):
            r.evaluate(point)

        # checkpoint, and the elastic commit
        if reason is None and (checkpoint_every.due(point.step) or stats.checkpoint > 0):
            r.save_checkpoint(point)
        if reason is None and commit_every.due(point.step):
            commit()

    r.save_checkpoint(point)
    return point, reason


def train_elastic(r, config, point):
    """--elastic: Horovod's elastic mode. Every --commit_steps the weights, slots and step are
    copied to host memory; when a rank is lost the survivors go back to that commit, take new
    ranks and new shares of the data (each share's order restarts, LSTM rows from zero) and go
    on: the effective batch becomes (ranks left) x batch_size sentences, the per-rank update is
    unchanged. Ranks that join later get rank 0's weights the same way."""
    elastic_state = distributed.ElasticState(r.trainer.state_variables(), restart_point=point)

    def after_reset():
        r.reshard()
        elastic_state.restart_point = RunPoint.start(int(r.trainer.global_step), r.model)
        r.log(f"elastic reset: {distributed.size()} rank(s) from the commit at step {int(r.trainer.global_step)}; "
              f"data re-sharded, LSTM rows from zero, effective batch {distributed.size()} x {r.hps.batch_size} "
              "sentences")

    elastic_state.register_reset_callbacks([after_reset])

    @distributed.elastic_run
    def train(state):
        # The step as every rank holds it after Horovod's sync of rank 0's state.
        try:
            return train_steps(r, config, dataclasses.replace(state.restart_point, step=int(r.trainer.global_step)),
                               commit=state.commit)
        except Exception:
            r.watchdog.pause()  # a lost rank: Horovod's reset waits for the hosts, train_steps re-arms it
            raise

    return train(elastic_state)


def run(config):
    """Trains until a limit or a stop signal; returns the final heldout perplexity."""
    r = Run(config)
    try:
        with distributed.collectives_fail_as_one_error():
            r.watchdog.start(step=None)  # the start too: a rank may stop answering before the first step
            with r.watchdog.activity("start", "the start of the run (the device report, the restore)"):
                r.log_start()
                point = r.checkpoints.restore(r.log)
            if config.elastic:
                point, reason = train_elastic(r, config, point)
            else:
                point, reason = train_steps(r, config, point)
            return r.finish(point, reason)
    except distributed.CollectiveFailed as err:
        raise r.watchdog.collective_failed(str(err)) from None
    finally:
        r.watchdog.stop()


def parse_args(argv):
    """The TrainConfig of the command line, with the defaults that depend on other flags filled in."""
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.train")
    console.add_options(parser, TrainConfig)
    config = console.from_options(TrainConfig, parser.parse_args(argv))
    preset = config.preset or ("default" if config.datadir else "demo")
    max_time = config.max_time
    if not config.datadir and not (config.max_steps or config.max_time):
        max_time = DEMO_MINUTES * 60.0  # the demo is a few minutes, not an endless run
    return dataclasses.replace(config, preset=preset, logdir=config.logdir or os.path.join("runs", preset),
                               max_time=max_time)


def main(argv=None):
    config = parse_args(argv)
    return console.run_main(lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
