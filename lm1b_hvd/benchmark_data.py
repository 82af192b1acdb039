"""`python -m lm1b_hvd.benchmark_data`: batches/s and words/s of the training input pipeline.

Measures one process (one core) reading shards, mapping words to ids,
shuffling and packing, with the default batch shape unless told otherwise.
The trainer needs this well above its own words/s per process.

Examples:
  python -m lm1b_hvd.benchmark_data                         # the demo corpus
  python -m lm1b_hvd.benchmark_data --datadir /data/lm1b --seconds 30
"""
import os
import sys
import time

from lm1b_hvd import console, hparams
from lm1b_hvd.data import dataset, demo_corpus, vocab


def measure(training_data, batch_size, num_steps, seconds, seed=0):
    """(batches, predicted words, elapsed seconds) after about `seconds` of packing."""
    batches = words = 0
    start = time.perf_counter()
    for _, _, w, _ in training_data.iterate_forever(batch_size, num_steps, [seed]):
        batches += 1
        words += int(w.sum())
        if time.perf_counter() - start >= seconds:
            break
    return batches, words, time.perf_counter() - start


def main(argv=None):
    defaults = hparams.PRESETS["default"]
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.benchmark_data")
    parser.add_argument("--datadir", default=None, help="lm1b layout; default: the demo corpus")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="rows of a batch")
    parser.add_argument("--num_steps", type=int, default=defaults.num_steps, help="words of a row per batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to pack batches")
    args = parser.parse_args(argv)

    return console.run_main(lambda: report(args))


def report(args):
    datadir = args.datadir or demo_corpus.ensure_demo_corpus()
    words = vocab.load(os.path.join(datadir, dataset.VOCAB_FILE))
    training_data = dataset.ShardedDataset.for_rank(datadir, "train", words)
    batches, predicted, elapsed = measure(training_data, args.batch_size, args.num_steps, args.seconds)
    console.say(f"pipeline: {datadir} batch {args.batch_size}x{args.num_steps}: "
                f"{batches / elapsed:.1f} batches/s, {predicted / elapsed:,.0f} words/s "
                f"({batches} batches in {elapsed:.1f}s, one process)")


if __name__ == "__main__":
    sys.exit(main())
