"""A training run: set up once (Run), then the loop (train_steps), in labelled blocks: step,
stop?, report, evaluate, checkpoint. `train(config)` is what `python -m lm1b_hvd.train` runs.

Every rank runs the same loop and acts at the same steps: a step returns its statistics summed
over ranks, and each rank's requests (a stop signal, out of time, a checkpoint due by rank 0's
clock) ride in that sum. Rank 0 alone prints and writes.
"""
import dataclasses
import enum
import math
import os
import time

from lm1b_hvd import console, devices, hparams, pinned_stack
from lm1b_hvd.data import dataset, demo_corpus, vocab
from lm1b_hvd.exchange import collectives
from lm1b_hvd.run import checkpoints, evaluation, init_from, reporting, stack, stop_requests, watchdog
from lm1b_hvd.run.lock import RunLock
from lm1b_hvd.run.position import RunPoint
from lm1b_hvd.update.step import Votes


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
    """What one training run is made of, set up once from the train command's config: the ranks,
    the data shares of this rank, the training stack (run.stack: sync mode, model, state,
    trainer), the evaluator, the checkpoints and the reports. The loop (train_steps) calls it."""

    def __init__(self, config):
        self.hps = hparams.build(config.preset, config.hpconfig)
        self.ranks = stack.start_ranks(self.hps, watchdog.stall_warning_seconds(config.step_timeout))
        devices.check_gpus_used(config.allow_cpu)
        self.config = config
        self.lock = RunLock(config.logdir)
        self.datadir = config.datadir or demo_corpus.ensure_demo_corpus()
        dataset.check_datadir(self.datadir)
        self.vocab = vocab.load(os.path.join(self.datadir, dataset.VOCAB_FILE))
        built = stack.build(self.hps, len(self.vocab), self.ranks,
                            stack.Launch(ranks_per_node=config.ranks_per_node, elastic=config.elastic))
        self.mode, self.model, self.state, self.trainer = built.mode, built.model, built.state, built.trainer
        self.init_source = init_from.check(config.init_from, self.hps) if config.init_from else None
        self._take_logdir()  # after the checks that only read, before the first write
        checkpoints.check_or_write_hparams(config.logdir, self.hps, len(self.vocab), write=self.ranks.is_root)
        if self.ranks.is_root:
            init_from.keep_vocabulary(config.logdir, self.datadir)
        self.train_data, self.heldout = self._data_shares()
        self.evaluator = evaluation.Evaluator(self.model, self.state.ema, self.ranks, report=self.log)
        self.checkpoints = checkpoints.RunCheckpoints(config.logdir, self.state, config.keep_checkpoints, self.ranks,
                                                      self.mode.checkpoint_parts())
        self.summaries = reporting.Summaries(config.logdir, self.ranks.is_root)
        self.profile = reporting.ProfileWindow(config.logdir, config.profile_steps, self.ranks.is_root)
        self.stop_requests = stop_requests.StopRequests()
        self.watchdog = watchdog.StepWatchdog(self.ranks.rank, config.step_timeout)

    def log(self, message):
        if self.ranks.is_root:
            console.say(message)

    def report_progress(self, progress, step):
        """The progress line of `step`, and its figures in L/progress.json for lm1b_hvd.status."""
        self.log(progress.line(step))
        if self.ranks.is_root:
            reporting.write_progress_file(self.config.logdir, progress.last)

    def _take_logdir(self):
        """Rank 0 takes the log directory's lock before anything is written there; when it
        cannot, every rank stops (rank 0 says why)."""
        refusal = None
        if self.ranks.is_root:
            try:
                self.lock.acquire()
            except console.UserError as err:
                refusal = str(err)
        refusal = self.ranks.root_decides(refusal)
        if refusal:
            raise console.UserError(refusal) if self.ranks.is_root else console.SaidByRankZero()

    def log_start(self):
        """What the run is: ranks, data, devices (a collective: every rank calls it), hparams,
        plan, and how the ranks keep together."""
        self.log(f"lm1b_hvd: {self.ranks.size} rank(s), {pinned_stack.describe_stack()}, data {self.datadir}, "
                 f"vocabulary {len(self.vocab)}, logdir {self.config.logdir}")
        description = devices.describe(collectives.cores_per_rank())
        for line in collectives.device_report(self.ranks, description, devices.on_gpu()):
            self.log(line)
        self.log(f"hparams: {self.hps.to_string()}")
        self.log(self.model.plan.describe())
        levels = self.mode.describe(self.config.max_steps)
        if levels:
            self.log(levels)

    def _data_shares(self):
        return tuple(dataset.ShardedDataset.for_rank(self.datadir, split, self.vocab, self.ranks.rank, self.ranks.size)
                     for split in ("train", "heldout"))

    def reshard(self):
        """After an elastic reset: this process's new share of the data, a step traced for the new
        ranks, and the lock and the writers if it is rank 0 now."""
        if self.ranks.is_root:
            self.lock.acquire()
        else:
            self.lock.release()
        self.train_data, self.heldout = self._data_shares()
        self.trainer.retrace()
        self.summaries.set_writer(self.ranks.is_root)

    def initialise(self, resumed):
        """--init_from: a new run takes the trained run's weights; a resume keeps its own."""
        if not self.init_source:
            return
        if resumed:
            self.log(f"--init_from {self.config.init_from} not used: the run resumes its own checkpoint")
            return
        self.log(init_from.start_from(self.init_source, self.state, self.vocab))

    def roll_back(self, point, settled):
        """Stopped at `point`, which is not settled (two-level, between outer steps): back to
        `settled`, which is what the checkpoint holds; a resume repeats the steps after it exactly."""
        point, said = self.mode.roll_back(point, settled)
        if said:
            self.log(said)
        return point

    def training_batches(self, position):
        return dataset.prefetch(self.train_data.iterate_forever(
            self.hps.batch_size, self.hps.num_steps, seed=[self.hps.seed, self.ranks.rank], position=position))

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
        decayed = self.state.lr_schedule.after_evaluation(value)
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
    # Evaluations, checkpoints and the end wait for a settled point (the sync mode's: in a
    # two-level run an outer step, where every node holds the same state); `settled` is the last.
    settled, evaluation_due, checkpoint_due = point, False, False
    r.watchdog.start(point.step)

    while reason is None:
        # step: the batch, each rank's requests, the update
        x, y, w, next_position = next(batches)
        stop_here = r.stop_requests.pending() is not None
        votes = Votes(stop_signal=stop_here, out_of_time=progress.out_of_time(),
                      checkpoint=r.ranks.is_root and checkpoint_clock.due(point.step))
        r.profile.before_step(point.step)
        row_state, stats = r.trainer.step(x, y, w, point.row_state, votes)
        point = RunPoint(point.step + 1, next_position, row_state)
        r.profile.after_step(point.step)
        check_finite(stats, point.step)
        r.watchdog.beat(point.step)

        # after the step, as the sync mode says (rank 0's state broadcast, an outer step)
        if r.mode.after_step(point.step, first=point.step == start_step + 1):
            settled = point

        # stop?
        reason = stop_reason(stats, point.step, config.max_steps, signal_here=stop_here)

        # report
        progress.add(stats)
        if summary_every.due(point.step):
            r.summaries.training(point.step, stats, progress.words_per_sec(), r.state, r.ranks.size)
        if log_every.due(point.step):
            r.report_progress(progress, point.step)

        # evaluate
        evaluation_due = eval_every.due(point.step) or evaluation_due
        if reason is None and evaluation_due and settled is point:
            r.evaluate(point)
            evaluation_due = False

        # checkpoint, and the elastic commit
        checkpoint_due = checkpoint_every.due(point.step) or stats.checkpoint > 0 or checkpoint_due
        if reason is None and checkpoint_due and settled is point:
            r.save_checkpoint(point)
            checkpoint_due = False
        if reason is None and commit_every.due(point.step):
            commit()

    if settled is not point:
        point = r.roll_back(point, settled)
    r.save_checkpoint(point)
    return point, reason


def train_elastic(r, config, point):
    """--elastic: Horovod's elastic mode. Every --commit_steps the state every rank shares is
    copied to host memory; when a rank is lost the survivors go back to that commit, take new
    ranks and new shares of the data (each share's order restarts, LSTM rows from zero) and go
    on: the effective batch becomes (ranks left) x batch_size sentences, the per-rank update is
    unchanged. Ranks that join later get rank 0's state the same way."""
    elastic_state = collectives.ElasticState(r.state.shared_variables(), restart_point=point)

    def after_reset():
        r.reshard()
        elastic_state.restart_point = RunPoint.start(int(r.state.step), r.model)
        r.log(f"elastic reset: {r.ranks.size} rank(s) from the commit at step {int(r.state.step)}; "
              f"data re-sharded, LSTM rows from zero, effective batch {r.ranks.size} x {r.hps.batch_size} "
              "sentences")

    elastic_state.register_reset_callbacks([after_reset])

    @collectives.elastic_run
    def train_from_commit(state):
        # The step as every rank holds it after Horovod's sync of rank 0's state.
        try:
            return train_steps(r, config, dataclasses.replace(state.restart_point, step=int(r.state.step)),
                               commit=state.commit)
        except Exception:
            r.watchdog.pause()  # a lost rank: Horovod's reset waits for the hosts, train_steps re-arms it
            raise

    return train_from_commit(elastic_state)


def train(config):
    """Trains until a limit or a stop signal; returns the final heldout perplexity."""
    r = Run(config)
    try:
        with collectives.collectives_fail_as_one_error():
            r.watchdog.start(step=None)  # the start too: a rank may stop answering before the first step
            with r.watchdog.activity("start", "the start of the run (the device report, the restore)"):
                r.log_start()
                resumed = r.checkpoints.any_on_disk()
                point = r.checkpoints.restore(r.log, announce_new_run=not r.init_source)
                r.initialise(resumed)
                r.mode.start()
            if config.elastic:
                point, reason = train_elastic(r, config, point)
            else:
                point, reason = train_steps(r, config, point)
            return r.finish(point, reason)
    except collectives.CollectiveFailed as err:
        raise r.watchdog.collective_failed(str(err)) from None
    finally:
        r.watchdog.stop()
