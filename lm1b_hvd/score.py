"""`python -m lm1b_hvd.score --logdir L --input FILE [--output OUT.jsonl] [--datadir D] [--stream]`

The log-probability of your own sentences under a trained model (rescoring ASR or MT n-best
lists, the perplexity of a new corpus). One JSON line per sentence: the sentence, its word
count, total log-probability in nats, the log-probability of each word and of the end of the
sentence, and how many words were <UNK>; then a summary line whose perplexity counts n + 1
predictions per n-word sentence, as evaluation does. Each sentence is scored on its own, from
a zero state at <S>; --stream instead carries the state across sentences as the heldout
evaluation does, and prints that perplexity (the number `lm1b_hvd.evaluate` gives for the
same file). The EMA weights are used when the run averaged them. Blank lines are skipped and
counted; words not in the vocabulary are <UNK> and counted. Sentences are plain text, tokenized
as the corpus was (its recipe, D/prepare.json from `prepare_data text`); with --tokenized, or
for a corpus without a recipe, they are tokens separated by spaces; each record then has the
`tokens` its word_log_probs follow.

Examples:
  python -m lm1b_hvd.score --logdir runs/demo --input sentences.txt --output scores.jsonl
  cat nbest.txt | python -m lm1b_hvd.score --logdir L --datadir /data/lm1b --input -
  python -m lm1b_hvd.score --logdir L --datadir D --input heldout.txt --stream --checkpoint best
"""
import json
import math
import sys
import time

from lm1b_hvd import console, inference
from lm1b_hvd.run import evaluation


class InputError(console.UserError):
    """An input file that cannot be scored."""


def read_sentences(path):
    """(non-blank lines as str, count of blank lines) of `path`, or of stdin for '-'."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an input file") from None
    lines, sentences = raw.splitlines(), []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{'stdin' if path == '-' else path} line {number}: not UTF-8 text") from None
        if line.split():
            sentences.append(text)
    if not sentences:
        raise InputError(f"{'stdin' if path == '-' else path}: no sentence to score "
                         f"({len(lines) - len(sentences)} blank line(s))")
    return sentences, len(lines) - len(sentences)


def sentence_records(sentences, tokens, scored):
    for text, words, result in zip(sentences, tokens, scored):
        yield {"sentence": text, "tokens": words, "words": result.words, "log_prob": round(result.log_prob, 6),
               "word_log_probs": [round(v, 6) for v in result.word_log_probs], "unk": result.unknown}


def stream_perplexity(trained, sentences):
    """The heldout evaluation's protocol over these sentences: rows of sentences laid back to back,
    the state carried, batch and window of the run."""
    encoded = [trained.vocab.sentence_ids(sentence.encode().split()) for sentence in sentences]
    loss_sum, words = evaluation.Evaluator(trained.model, None).sums(encoded)
    return evaluation.perplexity(loss_sum, words), int(words)


def score(args):
    trained = inference.TrainedModel(args.logdir, args.datadir, args.checkpoint)
    sentences, blank = read_sentences(args.input)
    started = time.monotonic()
    tokens = [trained.tokens(sentence, args.tokenized) for sentence in sentences]
    words = [" ".join(sentence_tokens) for sentence_tokens in tokens]
    unknown = sum(trained.vocab.unknown_count(sentence.encode().split()) for sentence in words)
    summary = {"sentences": len(sentences), "words": sum(map(len, tokens)), "unk": unknown,
               "blank_lines_skipped": blank, "tokenized_by": "you" if args.tokenized or not trained.recipe
               else "the corpus's recipe", "checkpoint": trained.path}
    if args.stream:
        perplexity, predictions = stream_perplexity(trained, words)
        records = []
        summary.update(protocol="stream", predictions=predictions, perplexity=perplexity)
    else:
        scored = trained.score([sentence.encode() for sentence in words], args.batch_size)
        records = list(sentence_records(sentences, tokens, scored))
        log_prob = sum(result.log_prob for result in scored)
        predictions = sum(result.words + 1 for result in scored)
        summary.update(protocol="sentence", predictions=predictions, log_prob=log_prob,
                       perplexity=math.exp(-log_prob / predictions))
    elapsed = time.monotonic() - started
    summary["sentences_per_sec"] = len(sentences) / max(elapsed, 1e-9)
    lines = [json.dumps(record) for record in records] + [json.dumps({"summary": summary})]
    text = "".join(line + "\n" for line in lines)
    if args.output:
        try:
            console.write_atomically(args.output, text)
        except OSError as err:
            raise InputError(f"{args.output}: cannot write ({err.strerror})") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    console.say(f"scored {len(sentences):,} sentences ({summary['words']:,} words, {unknown:,} <UNK>, "
                f"{blank:,} blank lines skipped) in {elapsed:.1f} s, {summary['sentences_per_sec']:,.0f} "
                f"sentences/s | perplexity {summary['perplexity']:.2f} ({summary['protocol']} protocol) | "
                f"{trained.path}", sys.stderr)


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.score")
    inference.add_model_arguments(parser)
    inference.add_tokenized_argument(parser, "the input")
    parser.add_argument("--input", required=True, help="one sentence per line; '-' reads stdin")
    parser.add_argument("--output", default="", help="JSON lines file to write; default: stdout")
    parser.add_argument("--stream", action="store_true",
                        help="carry the state across sentences (the heldout evaluation's protocol)")
    parser.add_argument("--batch_size", type=int, default=64, help="sentences scored at once")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return console.run_main(lambda: score(args))


if __name__ == "__main__":
    sys.exit(main())
