"""`python -m lm1b_hvd.sample --logdir L [--prefix "words ..."] [--num N] [--max_words M]
[--temperature T] [--top_k K] [--seed S]`

Sentences from a trained model: each continues the prefix (from <S>, zero state) one word at
a time, drawn from the full softmax divided by the temperature (and cut to the K most probable
words with --top_k), until the model writes the end mark <S> or --max_words words are out.
<UNK> is never drawn unless --allow_unk. The same seed gives the same sentences.

Examples:
  python -m lm1b_hvd.sample --logdir runs/demo --num 5
  python -m lm1b_hvd.sample --logdir L --datadir /data/lm1b --prefix "the president said" --temperature 0.8 --top_k 40
"""
import sys

import numpy as np
import tensorflow as tf

from lm1b_hvd import console, inference


def draw(log_probs, temperature, top_k, seed):
    """One word id per row from log-probabilities [rows, vocab], stateless in `seed`."""
    logits = log_probs / temperature
    if top_k:
        kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
        logits = tf.where(logits < kth, tf.float32.min, logits)
    return tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0].numpy()


def sample(trained, prefix, num, max_words, temperature, top_k, seed, allow_unk):
    """`num` word lists, each the prefix's words then the sampled continuation (without <S>)."""
    mark, unk = trained.vocab.sentence_id, trained.vocab.unk_id
    log_probs, state = trained.next_word_log_probs([prefix] * num)
    words = [[] for _ in range(num)]
    finished = np.zeros(num, bool)
    for position in range(max_words + 1):
        if not allow_unk:
            log_probs = tf.tensor_scatter_nd_update(log_probs, [[row, unk] for row in range(num)],
                                                    tf.fill([num], tf.float32.min))
        chosen = draw(log_probs, temperature, top_k, tf.constant([seed, position], tf.int64))
        for row, word in enumerate(chosen):
            if not finished[row]:
                if word == mark or position == max_words:
                    finished[row] = True
                else:
                    words[row].append(trained.vocab.id_to_word(int(word)))
        if finished.all():
            break
        log_probs, state = trained.continue_from(chosen, state)
    return [prefix.split() + row for row in words]


def run(args):
    trained = inference.TrainedModel(args.logdir, args.datadir, args.checkpoint)
    unknown = [word for word in args.prefix.split() if word.encode() not in trained.vocab.ids]
    if unknown:
        console.say(f"note: prefix word(s) not in the vocabulary, read as <UNK>: {' '.join(unknown)}", sys.stderr)
    for sentence in sample(trained, args.prefix, args.num, args.max_words, args.temperature, args.top_k,
                           args.seed, args.allow_unk):
        console.say(" ".join(sentence))


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.sample")
    inference.add_model_arguments(parser)
    parser.add_argument("--prefix", default="", help="words the sentences start with")
    parser.add_argument("--num", type=int, default=10, help="sentences to draw")
    parser.add_argument("--max_words", type=int, default=50, help="continuation words at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="< 1 sharper, > 1 flatter")
    parser.add_argument("--top_k", type=int, default=0, help="draw from the K most probable words only")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same sentences")
    parser.add_argument("--allow_unk", action="store_true", help="let <UNK> be drawn")
    args = parser.parse_args(argv)
    if args.num < 1 or args.max_words < 1 or args.temperature <= 0 or args.top_k < 0:
        parser.error("--num and --max_words must be >= 1, --temperature > 0, --top_k >= 0")
    return console.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
