"""A trained model put to use: its weights (the EMA averages when the run kept them) and
vocabulary from a log directory, and what users ask of it: the log-probability of each word of
their sentences, the distribution of the next word after a prefix, sentences drawn from it.
Full softmax throughout, in one process: no Horovod and no training step are loaded.
"""
import dataclasses
import numpy as np
import tensorflow as tf

from lm1b_hvd.data import demo_corpus, text_recipe
from lm1b_hvd.run import checkpoints
from lm1b_hvd.run.weights import run_weights


@dataclasses.dataclass(frozen=True)
class ScoredSentence:
    words: int  # n: the sentence's words
    unknown: int  # how many of them the vocabulary maps to <UNK>
    word_log_probs: list  # n + 1 natural-log probabilities: each word, then the end mark <S>

    @property
    def log_prob(self):
        return float(sum(self.word_log_probs))


def add_tokenized_argument(parser, what):
    parser.add_argument("--tokenized", action="store_true",
                        help=f"{what} is tokens already (default: tokenized by the corpus's recipe, D/prepare.json, "
                             "when it has one)")


def add_model_arguments(parser):
    """The flags of every command that uses a trained model: the run, its vocabulary, which checkpoint."""
    parser.add_argument("--logdir", required=True, help="the training run's log directory")
    parser.add_argument("--datadir", default="", help="for its vocabulary; default: the demo corpus")
    parser.add_argument("--checkpoint", default="latest", choices=("latest", "best"),
                        help="the newest checkpoint, or the one of the best heldout perplexity (L/best)")


class TrainedModel:
    """The model of a log directory, ready to score and predict (no optimizer is built)."""

    def __init__(self, logdir, datadir="", checkpoint="latest"):
        self.datadir = datadir or demo_corpus.ensure_demo_corpus()
        # Inference in fp32 whatever the run trained in: the numbers a SavedModel export gives.
        weights = run_weights(logdir, self.datadir, precision="fp32")
        self.hps, self.vocab, self.model = weights.hps, weights.vocab, weights.state.model
        self.path = checkpoints.find_checkpoint(logdir, checkpoint)
        weights.state.restore(self.path)
        if self.hps.average_params:  # inference uses the averages, as evaluation does
            weights.state.ema.copy_averages_to_targets()
        self.step = checkpoints.step_of(self.path)
        self.recipe = text_recipe.read_recipe(self.datadir)  # None: the corpus's text is its tokens
        self._window_log_probs = tf.function(self._window_log_probs_eager)
        self._next_log_probs = tf.function(self.model.full_log_probs)

    def tokens(self, text, tokenized=False):
        """The words of `text` (str) as the corpus has them: the recipe's tokens, or the text
        split on whitespace when it has none or the text is `tokenized` already."""
        return text.split() if tokenized or self.recipe is None else self.recipe.tokens(text)

    def text(self, tokens):
        """Tokens as text: the recipe's detokenizer, or joined by spaces when it has none."""
        return " ".join(tokens) if self.recipe is None else self.recipe.text(tokens)

    def encode(self, sentence):
        """(Vocabulary.sentence_ids of a sentence (bytes or str), how many of its words are <UNK>)."""
        tokens = (sentence.encode() if isinstance(sentence, str) else sentence).split()
        return self.vocab.sentence_ids(tokens), self.vocab.unknown_count(tokens)

    def score(self, sentences, batch_size=64):
        """ScoredSentence for each sentence (bytes, split on whitespace), each from a fresh zero
        state at `<S>`, `batch_size` sentences at a time."""
        scored = []
        for start in range(0, len(sentences), batch_size):
            encoded = [self.encode(sentence) for sentence in sentences[start:start + batch_size]]
            log_probs = self._log_probs([ids for ids, _ in encoded], batch_size)
            for row, (ids, unknown) in enumerate(encoded):
                scored.append(ScoredSentence(len(ids) - 2, unknown, log_probs[row, :len(ids) - 1].tolist()))
        return scored

    def _log_probs(self, sequences, batch_size):
        """log P(sequence[t + 1] | sequence[:t + 1]) [batch_size, T]: windows of num_steps with the
        state carried, as in training, so one traced shape serves every length."""
        steps = self.hps.num_steps
        length = max(len(s) for s in sequences) - 1
        padded = -(-length // steps) * steps
        x = np.zeros((batch_size, padded), np.int32)
        y = np.zeros((batch_size, padded), np.int32)
        for row, sequence in enumerate(sequences):
            x[row, :len(sequence) - 1] = sequence[:-1]
            y[row, :len(sequence) - 1] = sequence[1:]
        state = self.model.zero_state(batch_size)
        out = []
        for start in range(0, padded, steps):
            log_probs, state = self._window_log_probs(x[:, start:start + steps], y[:, start:start + steps], state)
            out.append(log_probs.numpy())
        return np.concatenate(out, axis=1)

    def _window_log_probs_eager(self, x, y, state):
        outputs, state = self.model.forward(x, state, training=False)
        return -self.model.full_softmax_losses(outputs, y), state

    def next_word_log_probs(self, prefixes):
        """log P(next word | `<S>` prefix) [len(prefixes), vocab] and the state after each prefix
        (all prefixes the same number of words)."""
        x = np.array([self.vocab.sentence_ids(prefix.encode().split(), end_mark=False) for prefix in prefixes])
        outputs, state = self.model.forward(x, self.model.zero_state(len(prefixes)), training=False)
        return self._next_log_probs(outputs[:, -1]), state

    def continue_from(self, word_ids, state):
        """The next-word log-probabilities after feeding one word per row, and the new state."""
        outputs, state = self.model.forward(tf.reshape(tf.constant(word_ids, tf.int32), [-1, 1]), state,
                                            training=False)
        return self._next_log_probs(outputs[:, -1]), state


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How `sample` draws: sentences (`num`), each at most `max_words` words after the prefix,
    each word from the full softmax divided by `temperature`, cut to the `top_k` most probable
    when given; <UNK> only with `allow_unk`; the same `seed`, the same sentences."""
    num: int = 10
    max_words: int = 50
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    allow_unk: bool = False


def draw(log_probs, temperature, top_k, seed):
    """One word id per row from log-probabilities [rows, vocab], stateless in `seed`."""
    logits = log_probs / temperature
    if top_k:
        kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
        logits = tf.where(logits < kth, tf.float32.min, logits)
    return tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0].numpy()


def sample(trained, prefix, options):
    """`options.num` word lists, each the prefix's words then the continuation drawn one word at
    a time (from <S> and a zero state) until the end mark <S> or `options.max_words` words."""
    num = options.num
    mark, unk = trained.vocab.sentence_id, trained.vocab.unk_id
    log_probs, state = trained.next_word_log_probs([prefix] * num)
    words = [[] for _ in range(num)]
    finished = np.zeros(num, bool)
    for position in range(options.max_words + 1):
        if not options.allow_unk:
            log_probs = tf.tensor_scatter_nd_update(log_probs, [[row, unk] for row in range(num)],
                                                    tf.fill([num], tf.float32.min))
        chosen = draw(log_probs, options.temperature, options.top_k, tf.constant([options.seed, position], tf.int64))
        for row, word in enumerate(chosen):
            if not finished[row]:
                if word == mark or position == options.max_words:
                    finished[row] = True
                else:
                    words[row].append(trained.vocab.id_to_word(int(word)))
        if finished.all():
            break
        log_probs, state = trained.continue_from(chosen, state)
    return [prefix.split() + row for row in words]
