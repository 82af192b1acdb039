"""`python -m lm1b_hvd.prepare_data demo|lm1b`: make the demo corpus or fetch the real benchmark.

  python -m lm1b_hvd.prepare_data demo
  python -m lm1b_hvd.prepare_data lm1b --outdir /data/lm1b
"""
import sys

from lm1b_hvd import console
from lm1b_hvd.data import demo_corpus, lm1b_download


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.prepare_data")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate (once) the built-in demo corpus")
    demo.add_argument("--cache_dir", default=None, help="default: $LM1B_HVD_CACHE or ~/.cache/lm1b_hvd")
    demo.add_argument("--seed", type=int, default=0, help="which demo language")
    real = commands.add_parser("lm1b", help="download and prepare the One Billion Word benchmark")
    real.add_argument("--outdir", required=True, help="where the benchmark is extracted")
    real.add_argument("--url", default=lm1b_download.DEFAULT_URL, help="the archive to download")
    real.add_argument("--sha256", default=None, help="expected SHA-256 of the archive")
    real.add_argument("--min_count", type=int, default=3, help="a word's training count to enter the vocabulary")
    real.add_argument("--keep_archive", action="store_true", help="keep the downloaded archive after extracting")
    args = parser.parse_args(argv)
    return console.run_main(lambda: prepare(args))


def prepare(args):
    if args.command == "demo":
        corpus = demo_corpus.ensure_demo_corpus(args.cache_dir, args.seed)
        oracle = demo_corpus.read_oracle(corpus)
        console.say(f"demo corpus: {corpus}")
        console.say(f"oracle heldout perplexity: {oracle['oracle_perplexity']:.2f} over "
                    f"{oracle['heldout_predictions']} predictions; {oracle['train_words']} training words")
        return
    datadir = lm1b_download.fetch_lm1b(args.outdir, args.url, args.sha256, args.min_count, args.keep_archive)
    console.say(f"lm1b ready: --datadir {datadir}")


if __name__ == "__main__":
    sys.exit(main())
