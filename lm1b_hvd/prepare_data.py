"""`python -m lm1b_hvd.prepare_data demo|lm1b|text`: make the demo corpus, fetch the real
benchmark, or make a corpus in its layout from your own plain text.

  python -m lm1b_hvd.prepare_data demo
  python -m lm1b_hvd.prepare_data lm1b --outdir /data/lm1b
  python -m lm1b_hvd.prepare_data text --input 'manuals/*.txt' transcripts.txt.gz --outdir /data/mine
  zcat dump.txt.gz | python -m lm1b_hvd.prepare_data text --input - --outdir /data/dump
"""
import math
import sys
import time

from lm1b_hvd import console
from lm1b_hvd.data import demo_corpus, lm1b_download, text_corpus
from lm1b_hvd.data.text_recipe import TOKENIZERS, UNICODE_FORMS, TextRecipe


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
    text = commands.add_parser(
        "text", help="plain text (one sentence or paragraph a line; .gz, .bz2, .xz too) to a corpus in lm1b's layout",
        description="Tokenizes (Moses' rules, as lm1b), drops duplicate sentences, shuffles with --seed, holds "
                    "out --heldout, writes training and heldout shards, a vocabulary and prepare.json (the recipe "
                    "`score` and `sample` apply to raw text). Example: python -m lm1b_hvd.prepare_data text "
                    "--input 'manuals/*.txt' --outdir /data/mine --heldout 5000")
    text.add_argument("--input", nargs="+", required=True,
                      help="files or globs (quote globs); .gz, .bz2 and .xz are decompressed; - reads standard input")
    text.add_argument("--outdir", required=True, help="a new or empty folder for the corpus")
    text.add_argument("--tokenizer", choices=TOKENIZERS, default="moses",
                      help="moses: Moses' rules via sacremoses; none: the text is tokens already")
    text.add_argument("--language", default="en", help="Moses' language rules")
    text.add_argument("--lowercase", action="store_true", help="lowercase every token")
    text.add_argument("--unicode", choices=UNICODE_FORMS, default="none", help="Unicode normalisation first")
    text.add_argument("--heldout", type=float, default=0.01,
                      help="sentences held out: a fraction (below 1) or a count")
    text.add_argument("--min_count", type=int, default=3, help="a word's training count to enter the vocabulary")
    text.add_argument("--max_vocab", type=int, default=0, help="at most this many vocabulary entries (0: no limit)")
    text.add_argument("--shards", type=int, default=0, help="training shards (0: one per 64 MB of text)")
    text.add_argument("--seed", type=int, default=0, help="the shuffle's seed")
    text.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: one per core)")
    args = parser.parse_args(argv)
    return console.run_main(lambda: prepare(args))


MAX_SHARDS = 1000  # each an open file while the shards are written
MAX_WORKERS = 1024


def check_range(flag, value, low, high=None):
    """A number option within [low, high] (no upper bound without `high`), or one line naming it."""
    if value < low or (high is not None and value > high):
        raise text_corpus.PrepareError(f"{flag} {value}: must be {low} or more"
                                       + (f" and at most {high:,}" if high is not None else ""))


def check_text_options(args):
    """Every option of `text` checked before anything is read or written: one line naming it."""
    heldout = args.heldout
    if not (math.isfinite(heldout) and heldout > 0) or (heldout >= 1 and heldout != int(heldout)):
        raise text_corpus.PrepareError(f"--heldout {heldout:g}: a fraction between 0 and 1, or a whole count")
    check_range("--min_count", args.min_count, 1)
    check_range("--max_vocab", args.max_vocab, 0)
    check_range("--shards", args.shards, 0, MAX_SHARDS)
    check_range("--seed", args.seed, 0, 2 ** 63 - 1)
    check_range("--workers", args.workers, 0, MAX_WORKERS)
    text_corpus.check_outdir(args.outdir)


def prepare_text(args):
    check_text_options(args)
    files = text_corpus.input_files(args.input)
    recipe = TextRecipe(args.tokenizer, args.language, args.lowercase, args.unicode)
    started = time.monotonic()
    counts = text_corpus.prepare(files, args.outdir, recipe, text_corpus.Split(args.heldout, args.shards, args.seed),
                                 text_corpus.VocabularyRule(args.min_count, args.max_vocab), args.workers)
    sentences = counts.training_sentences + counts.heldout_sentences
    console.say(f"read {counts.lines:,} lines ({counts.input_bytes / 1e6:,.1f} MB) from {len(files)} file(s): "
                f"{sentences:,} sentences; dropped {counts.duplicates:,} duplicate(s), {counts.empty_lines:,} empty "
                f"line(s), {counts.undecodable_lines:,} line(s) not UTF-8")
    console.say(f"training: {counts.training_sentences:,} sentences, {counts.training_words:,} words; heldout: "
                f"{counts.heldout_sentences:,} sentences, {counts.heldout_words:,} words")
    console.say(f"vocabulary: {counts.vocabulary:,} entries (words seen {args.min_count}+ times"
                f"{f', at most {args.max_vocab:,}' if args.max_vocab else ''}); "
                f"{100 * counts.out_of_vocabulary_words / max(counts.training_words, 1):.2f}% of the training words "
                "are <UNK>")
    seconds = time.monotonic() - started
    console.say(f"corpus ready: --datadir {args.outdir} ({console.format_seconds(seconds)}, "
                f"{counts.input_bytes / 1e6 / max(seconds, 1e-9):,.1f} MB/s)")


def prepare(args):
    if args.command == "text":
        return prepare_text(args)
    if args.command == "demo":
        check_range("--seed", args.seed, 0)
        corpus = demo_corpus.ensure_demo_corpus(args.cache_dir, args.seed)
        oracle = demo_corpus.read_oracle(corpus)
        console.say(f"demo corpus: {corpus}")
        console.say(f"oracle heldout perplexity: {oracle['oracle_perplexity']:.2f} over "
                    f"{oracle['heldout_predictions']} predictions; {oracle['train_words']} training words")
        return
    check_range("--min_count", args.min_count, 1)
    datadir = lm1b_download.fetch_lm1b(args.outdir, args.url, args.sha256, args.min_count, args.keep_archive)
    console.say(f"lm1b ready: --datadir {datadir}")


if __name__ == "__main__":
    sys.exit(main())
