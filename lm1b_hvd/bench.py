"""`[horovodrun -np N] python -m lm1b_hvd.bench [--preset P] [--hpconfig k=v,...] [--vocab V] [--steps S]`

Times the real training step (forward, backward, gradient exchange, Adagrad,
EMA) on in-memory batches of Zipf-distributed word ids, so no file I/O is in
the figure, and prints after warm-up: the median step time, words/s over all
ranks, model FLOPs per word counted from the shapes, achieved GFLOP/s, the
peak of a large matmul measured in this same run, their ratio (MFU), the
bytes each kind of Horovod op (allreduce, allgather, alltoall) moved per rank
per step, counted from the tensors, and peak memory per rank. Two-level
(--hpconfig outer_every=H, nodes from the hosts or --ranks_per_node): the timed
steps are whole outer periods, the outer steps are timed apart and shared out
over the steps (words/s counts them), and the bytes are split into what stays
inside a node and what crosses between nodes, averaged over an outer period; an overlapped
exchange (outer_overlap) is timed from its send to its arrival, and the steps while one travels
apart from the others.

The compute a shared machine gives a process can change from one second to
the next, so the steps are timed in blocks of about half a second with the
matmul peak measured just before and after each block, and the MFU is the
median over blocks of each block's rate against its own peak.

Examples:
  python -m lm1b_hvd.bench                                # LSTM-2048-512, vocabulary 793,470
  python -m lm1b_hvd.bench --preset demo --steps 50
  horovodrun -np 2 python -m lm1b_hvd.bench --no_exchange # the same two processes, no allreduce
  horovodrun -np 4 python -m lm1b_hvd.bench --preset small --vocab 200000 --hpconfig vocab_parallel=true
  python -m lm1b_hvd.bench --hpconfig precision=bf16,xla=true
  horovodrun -np 2 python -m lm1b_hvd.bench --preset big_g4 --vocab 20000 --hpconfig batch_size=8 --steps 2
  horovodrun -np 4 python -m lm1b_hvd.bench --preset demo --steps 64 --ranks_per_node 2 --hpconfig outer_every=16
  horovodrun -np 4 --mpi python -m lm1b_hvd.bench --preset demo --steps 64 --ranks_per_node 2 \\
      --hpconfig outer_every=16,outer_slots=local,outer_bits=4,outer_overlap=true --steps_timeline timeline.json
"""
import json
import math
import resource
import statistics
import sys
import time
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd import console, devices, hparams
from lm1b_hvd.exchange import collectives
from lm1b_hvd.exchange.gradients import TRAFFIC_KINDS
from lm1b_hvd.model.cost import parameter_count, table_bytes_per_row, training_flops_per_word
from lm1b_hvd.run import stack

# The real lm1b vocabulary (words seen at least 3 times), every preset's default but the demo's.
LM1B_VOCAB = 793_470
VOCAB_SIZES = {"demo": 2_002}
PEAK_SIZE = 2048
PEAK_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}
PEAK_RUNS = 2  # matmuls timed before and after each block
BLOCK_SECONDS = 0.5  # timed steps between two peak samples


def zipf_batches(hps, vocab_size, count, seed):
    """`count` (x, y, w) batches of word ids drawn log-uniformly (Zipf's law over frequency ranks,
    the proposal of the sampled softmax), as in running text; every position is a real word."""
    rng = np.random.default_rng(seed)
    shape = (hps.batch_size, hps.num_steps + 1)
    batches = []
    for _ in range(count):
        ids = np.floor(np.exp(rng.uniform(0.0, np.log(vocab_size + 1.0), shape))) - 1
        ids = np.clip(ids, 0, vocab_size - 1).astype(np.int32)
        batches.append((ids[:, :-1], ids[:, 1:], np.ones(ids[:, 1:].shape, np.float32)))
    return batches


def _peak_matmul(a, b):
    return tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32))


class MatmulPeak:
    """FLOP/s of a large square matmul in `dtype`: the best of a few timed runs, sampled
    whenever asked (around each block of timed steps)."""

    def __init__(self, dtype):
        self.operand = tf.cast(tf.random.uniform([PEAK_SIZE, PEAK_SIZE], dtype=tf.float32), dtype)
        self.matmul = tf.function(_peak_matmul)  # named so a profile shows it as such
        self.matmul(self.operand, self.operand).numpy()

    def sample(self, runs=PEAK_RUNS):
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            self.matmul(self.operand, self.operand).numpy()
            best = min(best, time.perf_counter() - start)
        return 2.0 * PEAK_SIZE ** 3 / best


class Block(typing.NamedTuple):
    """Consecutive timed steps and the matmul peak of this rank measured around them."""
    step_times: list  # seconds
    step_stats: list  # training.StepStats, summed over ranks
    peak: float  # this rank's FLOP/s
    step_starts: list  # time.perf_counter() at each step's start

    @property
    def words(self):
        return sum(stats.words for stats in self.step_stats)


def timed_blocks(trainer, batches, row_state, steps, steps_per_block, peak, after_step=lambda: None):
    """Runs `steps` timed steps in blocks of `steps_per_block`, sampling the peak before and
    after each block (the better of the two is the block's peak); `after_step` (an outer step
    when one is due) runs after its step, outside the step's time (it times itself)."""
    blocks, done = [], 0
    while done < steps:
        before = peak.sample()
        times, step_stats, starts = [], [], []
        for _ in range(min(steps_per_block, steps - done)):
            starts.append(time.perf_counter())
            row_state, stats = trainer.step(*batches[done % len(batches)], row_state)
            times.append(time.perf_counter() - starts[-1])  # trainer.step returns host numbers: synchronous
            after_step()
            step_stats.append(stats)
            done += 1
        blocks.append(Block(times, step_stats, max(before, peak.sample()), starts))
    return blocks


def peak_memory_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parse_args(argv):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.bench")
    parser.add_argument("--preset", default="default", choices=sorted(hparams.PRESETS), help="hparams preset")
    parser.add_argument("--hpconfig", default="", help="overrides, e.g. precision=bf16,xla=true")
    parser.add_argument("--vocab", type=int, default=0,
                        help="vocabulary size; default: 793,470 (real lm1b), 2,002 for demo; a smaller one given "
                             "here: parameters and peak memory also projected to 793,470")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, allocation)")
    parser.add_argument("--no_exchange", action="store_true",
                        help="skip the gradient exchange: each rank applies its own gradients")
    parser.add_argument("--profile_dir", default="", help="write a TF profiler trace of the timed steps here "
                        "(between blocks it also shows the peak's matmuls, as _peak_matmul)")
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU even if the job was given GPUs")
    parser.add_argument("--steps_timeline", default="", help="write rank 0's timed steps, outer steps and overlapped "
                        "exchanges to this JSON file (scripts/plot_timeline.py draws it)")
    parser.add_argument("--ranks_per_node", type=int, default=0,
                        help="two-level (outer_every): ranks 0..K-1, K..2K-1, ... form the nodes; 0: the hosts")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")

    return args


def main(argv=None):
    args = parse_args(argv)
    return console.run_main(lambda: bench(args))


def bench(args):
    hps = hparams.build(args.preset, args.hpconfig)
    ranks = stack.start_ranks(hps)
    devices.check_gpus_used(args.allow_cpu)
    vocab_size = args.vocab or VOCAB_SIZES.get(args.preset, LM1B_VOCAB)
    rank, size = ranks.rank, ranks.size
    say = console.say if rank == 0 else (lambda text: None)
    say(f"bench: preset {args.preset}, {size} rank(s), vocabulary {vocab_size:,}, "
        f"batch {hps.batch_size}x{hps.num_steps} per rank, exchange {'off' if args.no_exchange else 'on'}")
    say(f"hparams: {hps.to_string()}")
    for line in collectives.device_report(ranks, devices.describe(collectives.cores_per_rank()), devices.on_gpu()):
        say(line)

    built = stack.build(hps, vocab_size, ranks,
                        stack.Launch(ranks_per_node=args.ranks_per_node, exchange=not args.no_exchange))
    mode, trainer = built.mode, built.trainer
    if args.steps % mode.period:
        raise console.UserError(f"--steps {args.steps} is not a multiple of {mode.period}, the steps from one settled "
                                "point to the next (outer_every): the bench times whole periods")
    say(built.model.plan.describe())
    levels = mode.describe()
    if levels:
        say(levels)
    mode.start()
    batches = zipf_batches(hps, vocab_size, count=4, seed=[hps.seed, rank])
    row_state = built.model.zero_state(hps.batch_size)

    # Warm-up: tracing, first allocations, and rank 0's weights everywhere as in training.
    for index in range(args.warmup):
        began = time.perf_counter()
        row_state, stats = trainer.step(*batches[index % len(batches)], row_state)
        mode.after_step(int(built.state.step), first=index == 0)
    warm_step = max(ranks.gather_numbers([time.perf_counter() - began]))
    steps_per_block = max(1, math.floor(BLOCK_SECONDS / warm_step))  # the same on every rank
    if args.steps_timeline:  # the steps back to back: the peak measured before and after them only
        steps_per_block = args.steps

    peak = MatmulPeak(PEAK_DTYPES[hps.precision])
    ranks.sum(tf.zeros([1])).numpy()  # every rank starts timing at once
    if args.profile_dir and rank == 0:
        tf.profiler.experimental.start(args.profile_dir)
    mode.start_timing()
    blocks = timed_blocks(trainer, batches, row_state, args.steps, steps_per_block, peak,
                          after_step=lambda: mode.after_step(int(built.state.step), first=False))
    mode.finish()
    if args.profile_dir and rank == 0:
        tf.profiler.experimental.stop()
    if args.steps_timeline and rank == 0:
        write_timeline(args.steps_timeline, blocks, mode)

    setting = Setting(hps, vocab_size, ranks, exchange=size > 1 and not args.no_exchange,
                      reduced_vocab=0 < args.vocab < LM1B_VOCAB, mode=mode)
    report_figures(blocks, setting, say)


def write_timeline(path, blocks, mode):
    """The timed steps, and what the sync mode did beside them (its outer steps, its overlapped
    exchanges), as [start, end] seconds from the first step's start: JSON, for
    scripts/plot_timeline.py."""
    starts = [start for block in blocks for start in block.step_starts]
    times = [seconds for block in blocks for seconds in block.step_times]
    origin = starts[0]
    record = {"steps": [[start - origin, start - origin + seconds] for start, seconds in zip(starts, times)],
              "period": mode.period, **mode.timeline(origin)}
    with open(path, "w") as handle:
        json.dump(record, handle)


class Setting(typing.NamedTuple):
    """What was benched: the hparams, the vocabulary, the ranks, whether gradients were exchanged,
    whether the vocabulary is smaller than lm1b's (then the figures are projected to it), and the
    sync mode (run.modes), which says what it did beside the steps."""
    hps: object
    vocab_size: int
    ranks: object
    exchange: bool
    reduced_vocab: bool = False
    mode: object = None


def report_figures(blocks, setting, say):
    """Prints the bench's figures from every rank's timed blocks (a collective: every rank calls
    it); with `reduced_vocab`, the parameters and peak memory at the real vocabulary too."""
    hps, vocab_size, ranks, exchange, reduced_vocab, mode = setting
    size = ranks.size
    times = [t for block in blocks for t in block.step_times]
    step_stats = [stats for block in blocks for stats in block.step_stats]
    # What the sync mode did beside the steps (a two-level run's outer steps, the steps an overlapped
    # exchange slowed) shared out over them.
    step_time = statistics.median(times) + mode.seconds_beside_steps(times) / len(times)
    words_per_step = sum(stats.words for stats in step_stats) / len(times)  # all ranks together
    flops_per_word = training_flops_per_word(hps, vocab_size)
    achieved = words_per_step * flops_per_word / step_time
    # Each block's peak summed over ranks (they ran the block together), then its MFU.
    rank_peaks = ranks.gather_numbers([block.peak for block in blocks])
    block_peaks = [sum(rank_peaks[i::len(blocks)]) for i in range(len(blocks))]
    block_mfu = [100 * block.words * flops_per_word / sum(block.step_times) / block_peak
                 for block, block_peak in zip(blocks, block_peaks)]
    say(f"step time: median {statistics.median(times) * 1e3:,.1f} ms over {len(times)} steps "
        f"(min {min(times) * 1e3:,.1f}, max {max(times) * 1e3:,.1f})")
    say(f"words/s: {words_per_step / step_time:,.0f} over {size} rank(s) "
        f"({words_per_step / size:,.0f} words per rank per step)")
    say(f"model FLOPs per word: {flops_per_word / 1e6:,.1f} M (training: 3 x forward)")
    for vocab in [vocab_size] + ([LM1B_VOCAB] if reduced_vocab else []):
        count = parameter_count(hps, vocab)
        say(f"parameters at vocabulary {vocab:,}: {count.total / 1e6:,.1f} M (LSTM {count.lstm / 1e6:,.1f} M, "
            f"embedding {count.embedding / 1e6:,.1f} M, softmax {count.softmax / 1e6:,.1f} M"
            f"{', tied to the embedding' if hps.tie_embeddings else ''})"
            + ("" if vocab == vocab_size else ", not built here"))
    say(f"achieved: {achieved / 1e9:,.1f} GFLOP/s | matmul peak ({hps.precision} {PEAK_SIZE}^3, "
        f"measured around each block of steps): median {statistics.median(block_peaks) / 1e9:,.1f}, "
        f"best {max(block_peaks) / 1e9:,.1f} GFLOP/s over {size} rank(s)")
    say(f"MFU: {statistics.median(block_mfu):.1f}% (median over {len(blocks)} block(s) of "
        f"{len(blocks[0].step_times)} step(s), each against the peak measured around it: "
        + " ".join(f"{m:.1f}" for m in block_mfu) + ")")
    if exchange:
        for kind in TRAFFIC_KINDS:
            sent, received = (statistics.median(getattr(stats, f"{kind}_{way}") / size for stats in step_stats)
                              for way in ("sent", "received"))
            if sent or received:
                say(f"{mode.step_exchange_where}{kind}: sent {sent / 1e6:,.2f} MB, received {received / 1e6:,.2f} MB "
                    "per rank per step")
    for line in mode.bench_lines(times, step_time):
        say(line)
    if exchange:
        saved = statistics.median(stats.duplicate_bytes / size for stats in step_stats)
        if saved:
            say(f"summing duplicate rows before the exchange saved {saved / 1e6:,.2f} MB per rank per step")
    memory = ranks.gather_numbers([peak_memory_bytes()])
    say("peak memory per rank: " + ", ".join(f"{m / 2 ** 30:.2f} GiB" for m in memory))
    if reduced_vocab:
        say(projected_memory_line(hps, vocab_size, max(memory), size))


def projected_memory_line(hps, vocab_size, peak, ranks):
    """The largest rank's peak projected to the real vocabulary: what grows with the vocabulary
    is the rows a rank holds (all of them replicated, 1/ranks vocabulary-parallel), each
    table_bytes_per_row; the step's gathered rows and the LSTM do not grow with it."""
    holders = ranks if hps.vocab_parallel else 1
    per_row = table_bytes_per_row(hps) / holders
    projected = peak + (LM1B_VOCAB - vocab_size) * per_row
    return (f"projected to vocabulary {LM1B_VOCAB:,}: {projected / 2 ** 30:.2f} GiB per rank (the largest peak "
            f"here + {LM1B_VOCAB - vocab_size:,} rows x {per_row:,.0f} bytes held per rank: "
            f"{'1/' + str(ranks) + ' of ' if holders > 1 else ''}the tables and their Adagrad accumulators)")


if __name__ == "__main__":
    sys.exit(main())
