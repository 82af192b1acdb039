"""`python -m lm1b_hvd.sample --logdir L [--prefix "words ..."] [--num N] [--max_words M]
[--temperature T] [--top_k K] [--seed S]`

Sentences from a trained model: each continues the prefix (from <S>, zero state) one word at
a time, drawn from the full softmax divided by the temperature (and cut to the K most probable
words with --top_k), until the model writes the end mark <S> or --max_words words are out.
<UNK> is never drawn unless --allow_unk. The same seed gives the same sentences. The prefix is
plain text and the sentences come out as text, through the corpus's recipe (D/prepare.json from
`prepare_data text`); --tokenized takes the prefix as tokens, --tokens prints tokens, and a
corpus without a recipe has tokens both ways.

Examples:
  python -m lm1b_hvd.sample --logdir runs/demo --num 5
  python -m lm1b_hvd.sample --logdir L --datadir /data/lm1b --prefix "the president said" --temperature 0.8 --top_k 40
"""
import math
import sys

from lm1b_hvd import console, inference


def run(args):
    trained = inference.TrainedModel(args.logdir, args.datadir, args.checkpoint)
    prefix = " ".join(trained.tokens(args.prefix, args.tokenized))
    unknown = [word for word in prefix.split() if word.encode() not in trained.vocab.ids]
    if unknown:
        console.say(f"note: prefix word(s) not in the vocabulary, read as <UNK>: {' '.join(unknown)}", sys.stderr)
    options = inference.SamplingOptions(num=args.num, max_words=args.max_words, temperature=args.temperature,
                                        top_k=args.top_k, seed=args.seed, allow_unk=args.allow_unk)
    for sentence in inference.sample(trained, prefix, options):
        console.say(" ".join(sentence) if args.tokens else trained.text(sentence))


def main(argv=None):
    defaults = inference.SamplingOptions()
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.sample")
    inference.add_model_arguments(parser)
    inference.add_tokenized_argument(parser, "the prefix")
    parser.add_argument("--prefix", default="", help="words the sentences start with")
    parser.add_argument("--num", type=int, default=defaults.num, help="sentences to draw")
    parser.add_argument("--max_words", type=int, default=defaults.max_words, help="continuation words at most")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="< 1 sharper, > 1 flatter")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="draw from the K most probable words only")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the same seed gives the same sentences")
    parser.add_argument("--allow_unk", action="store_true", help="let <UNK> be drawn")
    parser.add_argument("--tokens", action="store_true", help="print tokens, not text")
    args = parser.parse_args(argv)
    if (args.num < 1 or args.max_words < 1 or not 0 < args.temperature < math.inf or args.top_k < 0
            or not 0 <= args.seed < 2 ** 63):
        parser.error("--num and --max_words must be >= 1, --temperature a finite number > 0, --top_k and --seed >= 0")
    return console.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
