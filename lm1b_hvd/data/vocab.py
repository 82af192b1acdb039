"""The lm1b vocabulary file (`word count` per line, most frequent first), and the one rule that
turns a sentence into ids: `<S> w1 .. wn <S>`, words split on ASCII whitespace, a word not in
the vocabulary read as `<UNK>`.

Ids are line numbers (from 0), so frequent words get small ids and the
log-uniform candidate sampler of the sampled softmax is the right proposal.
Words are kept as bytes: sentences are matched against them byte for byte
(data/dataset.py), so a file that is not valid UTF-8 still reads.
"""
import numpy as np

from lm1b_hvd import console

SENTENCE_MARK = b"<S>"
UNKNOWN = b"<UNK>"


class VocabError(console.UserError):
    """A vocabulary file that is missing or malformed."""


class Vocabulary:
    def __init__(self, words, counts=None):
        self.words = list(words)
        self.counts = list(counts) if counts is not None else [0] * len(self.words)
        self.ids = {}
        for index, word in enumerate(self.words):
            self.ids.setdefault(word, index)
        for required in (SENTENCE_MARK, UNKNOWN):
            if required not in self.ids:
                raise VocabError(f"vocabulary has no {required.decode()} entry")
        self.sentence_id = self.ids[SENTENCE_MARK]
        self.unk_id = self.ids[UNKNOWN]

    def __len__(self):
        return len(self.words)

    def word_to_id(self, word):
        if isinstance(word, str):
            word = word.encode("utf-8")
        return self.ids.get(word, self.unk_id)

    def id_to_word(self, index):
        return self.words[index].decode("utf-8", errors="replace")

    def sentence_ids(self, tokens, end_mark=True):
        """The ids of a sentence's words (bytes, as `line.split()` gives them) as an int32 array
        `<S> w1 .. wn <S>`, or without the final `<S>` (a prefix to continue)."""
        ids, unk, mark = self.ids, self.unk_id, self.sentence_id
        return np.array([mark, *[ids.get(token, unk) for token in tokens], *([mark] if end_mark else [])], np.int32)

    def unknown_count(self, tokens):
        """How many of `tokens` sentence_ids reads as `<UNK>`."""
        return sum(1 for token in tokens if token not in self.ids)

    def write(self, path):
        """Writes `word count` lines; the temp-file rename keeps a reader from seeing half a file."""
        console.write_atomically(path, b"".join(
            word + b" " + str(count).encode() + b"\n" for word, count in zip(self.words, self.counts)))


def from_counts(counts, sentences, min_count=1, max_vocab=0):
    """The Vocabulary of a corpus from its word counts (a Counter of bytes) and its sentence
    count: `<S>` (counted once a sentence), `<UNK>` (every occurrence of a word left out), then
    the words seen `min_count` times or more, most frequent first (ties by the word's bytes),
    at most `max_vocab` entries in all when it is above 0."""
    kept = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
    if max_vocab:
        kept = kept[:max(max_vocab - 2, 0)]
    rare = sum(counts.values()) - sum(count for _, count in kept)
    return Vocabulary([SENTENCE_MARK, UNKNOWN] + [word for word, _ in kept], [sentences, rare] + [c for _, c in kept])


def load(path):
    """Reads a vocabulary file; errors name the file and, for bad lines, the line number."""
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise VocabError(f"{path}: vocabulary file not found") from None
    except IsADirectoryError:
        raise VocabError(f"{path}: vocabulary path is a directory, not a file") from None
    except OSError as err:
        raise VocabError(f"{path}: cannot read the vocabulary file ({err.strerror})") from None
    words, counts = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            raise VocabError(f"{path}:{number}: blank line in vocabulary file")
        if len(fields) != 2 or not fields[1].isdigit():
            shown = line.decode("utf-8", errors="replace")[:60]
            raise VocabError(f"{path}:{number}: expected 'word count', got '{shown}'")
        words.append(fields[0])
        counts.append(int(fields[1]))
    try:
        return Vocabulary(words, counts)
    except VocabError as err:
        raise VocabError(f"{path}: {err}") from None
