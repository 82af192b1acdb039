"""The built-in demo corpus: a seeded synthetic language written in the lm1b layout.

The language is a hidden Markov model over word classes: a sentence starts in
a class drawn from a sparse start distribution, each class emits a word from
its own Zipf-weighted share of the vocabulary (some words belong to two
classes, so the class is not always visible), moves to one of a few successor
classes, or ends the sentence. Its exact heldout perplexity (the oracle) is
known, so a trained model can be judged against the best possible number.
The oracle counts tokens exactly as evaluation does: a sentence of n words is
n + 1 predictions, the last one the closing `<S>`.
"""
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import tempfile

import numpy as np

from lm1b_hvd.data import dataset
from lm1b_hvd.data.vocab import SENTENCE_MARK, UNKNOWN, Vocabulary

FORMAT_VERSION = 1
ORACLE_FILE = "oracle.json"
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    num_words: int = 2000
    num_classes: int = 24
    successors: int = 4          # classes reachable from each class
    start_classes: int = 6       # classes a sentence can start in
    shared_words: float = 0.15   # fraction of words emitted by two classes
    zipf_exponent: float = 1.0
    end_prob: tuple = (0.04, 0.12)  # per-class chance to end the sentence
    seed: int = 0


@dataclasses.dataclass
class HiddenMarkovLanguage:
    """start[c], transition[c, c'] (rows sum to 1 - end[c]), end[c], emission[c, w]."""
    start: np.ndarray
    transition: np.ndarray
    end: np.ndarray
    emission: np.ndarray
    words: list

    @classmethod
    def random(cls, spec):
        rng = np.random.default_rng(spec.seed)
        k, v = spec.num_classes, spec.num_words
        zipf = 1.0 / np.arange(1, v + 1) ** spec.zipf_exponent
        membership = np.zeros((k, v), bool)
        membership[rng.integers(0, k, size=v), np.arange(v)] = True
        shared = rng.random(v) < spec.shared_words
        membership[rng.integers(0, k, size=v)[shared], np.arange(v)[shared]] = True
        emission = membership * zipf * rng.gamma(2.0, 1.0, size=(k, v))
        emission /= emission.sum(axis=1, keepdims=True)
        end = rng.uniform(*spec.end_prob, size=k)
        transition = np.zeros((k, k))
        for c in range(k):
            targets = rng.choice(k, size=spec.successors, replace=False)
            transition[c, targets] = rng.dirichlet(np.ones(spec.successors))
        transition *= (1.0 - end)[:, None]
        start = np.zeros(k)
        start[rng.choice(k, size=spec.start_classes, replace=False)] = rng.dirichlet(
            np.ones(spec.start_classes))
        return cls(start, transition, end, emission, [spell(i) for i in range(v)])

    def sample(self, num_sentences, rng, batch=4096):
        """Sentences as lists of word indices, drawn `batch` at a time with vectorised steps."""
        k = len(self.start)
        next_state = np.concatenate([self.transition, self.end[:, None]], axis=1).cumsum(axis=1)
        emission_cdf = self.emission.cumsum(axis=1)
        start_cdf = self.start.cumsum()
        out = []
        while len(out) < num_sentences:
            n = min(batch, num_sentences - len(out))
            state = _draw(start_cdf[None, :], np.zeros(n, np.int64), rng)
            sentences = [[] for _ in range(n)]
            alive = np.arange(n)
            while alive.size:
                words = _draw(emission_cdf, state, rng)
                for index, word in zip(alive, words):
                    sentences[index].append(int(word))
                state = _draw(next_state, state, rng)
                keep = state < k
                alive, state = alive[keep], state[keep]
            out.extend(sentences)
        return out

    def sentence_log_prob(self, sentence):
        """log P(w1..wn, end) by the scaled forward algorithm; -inf for the empty sentence, which
        the language never makes (every class emits a word before it may end)."""
        if not sentence:
            return -math.inf
        alpha = self.start * self.emission[:, sentence[0]]
        log_prob = 0.0
        for word in sentence[1:]:
            total = alpha.sum()
            log_prob += math.log(total)
            alpha = (alpha / total) @ self.transition * self.emission[:, word]
        return log_prob + math.log(alpha @ self.end)


def _draw(cdf_table, rows, rng):
    """One index from the cumulative distribution `cdf_table[r]` for each r in `rows`."""
    u = rng.random(len(rows))
    out = np.empty(len(rows), np.int64)
    for row in np.unique(rows):
        pick = rows == row
        cdf = cdf_table[row]
        out[pick] = np.minimum(np.searchsorted(cdf, u[pick] * cdf[-1], side="right"), len(cdf) - 1)
    return out


def spell(index):
    """A pronounceable, unique spelling for word `index` (bijective base-70 syllables)."""
    base, parts = len(SYLLABLES), []
    index += 1
    while index:
        index, digit = divmod(index - 1, base)
        parts.append(SYLLABLES[digit])
    return "".join(reversed(parts))


def oracle_perplexity(language, sentences):
    """exp(mean true negative log-probability per prediction), n + 1 predictions a sentence."""
    total = sum(language.sentence_log_prob(s) for s in sentences)
    predictions = sum(len(s) + 1 for s in sentences)
    return math.exp(-total / predictions), predictions


def _write_lines(path, words, sentences):
    with open(path, "w", encoding="utf-8") as out:
        for sentence in sentences:
            out.write(" ".join(words[w] for w in sentence) + "\n")


def write_corpus(outdir, spec=LanguageSpec(), train_sentences=200_000, heldout_sentences=4_000,
                 train_files=10):
    """Writes the lm1b layout, the vocabulary and oracle.json under `outdir`."""
    language = HiddenMarkovLanguage.random(spec)
    rng = np.random.default_rng(spec.seed + 1)
    train = language.sample(train_sentences, rng)
    heldout = language.sample(heldout_sentences, rng)
    train_dir = os.path.join(outdir, os.path.dirname(dataset.TRAIN_PATTERN))
    heldout_dir = os.path.join(outdir, os.path.dirname(dataset.HELDOUT_PATTERN))
    os.makedirs(train_dir)
    os.makedirs(heldout_dir)
    for shard, chunk in enumerate(np.array_split(np.arange(len(train)), train_files), start=1):
        path = os.path.join(train_dir, f"news.en-{shard:05d}-of-00100")
        _write_lines(path, language.words, (train[i] for i in chunk))
    _write_lines(os.path.join(heldout_dir, "news.en.heldout-00000-of-00050"), language.words, heldout)

    counts = np.bincount(np.concatenate([np.array(s) for s in train]), minlength=len(language.words))
    order = np.argsort(-counts, kind="stable")
    words = [SENTENCE_MARK, UNKNOWN] + [language.words[i].encode() for i in order]
    Vocabulary(words, [len(train), 0] + [int(counts[i]) for i in order]).write(
        os.path.join(outdir, dataset.VOCAB_FILE))

    perplexity, predictions = oracle_perplexity(language, heldout)
    info = {
        "format_version": FORMAT_VERSION,
        "oracle_perplexity": perplexity,
        "heldout_predictions": predictions,
        "train_words": int(counts.sum()),
        "spec": dataclasses.asdict(spec),
    }
    with open(os.path.join(outdir, ORACLE_FILE), "w") as out:
        json.dump(info, out, indent=1)
    return info


def default_cache_dir():
    return os.environ.get("LM1B_HVD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lm1b_hvd"))


@contextlib.contextmanager
def _exclusive(lock_path):
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_demo_corpus(cache_dir=None, seed=0):
    """The demo corpus directory, generated on first use.

    Any number of processes may call this at once: the first takes a file
    lock and writes into a temporary directory that is renamed into place when
    complete; the others wait on the lock and find it done.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"demo-v{FORMAT_VERSION}-seed{seed}")
    with _exclusive(target + ".lock"):
        if not os.path.exists(os.path.join(target, ORACLE_FILE)):
            scratch = tempfile.mkdtemp(prefix=".demo-", dir=cache_dir)
            try:
                write_corpus(os.path.join(scratch, "corpus"), LanguageSpec(seed=seed))
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.rename(os.path.join(scratch, "corpus"), target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return target


def read_oracle(corpus_dir):
    """oracle.json of a demo corpus, or None for other data directories."""
    path = os.path.join(corpus_dir, ORACLE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)
