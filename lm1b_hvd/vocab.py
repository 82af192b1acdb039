"""The lm1b vocabulary file: `word count` per line, most frequent first.

Ids are line numbers (from 0), so frequent words get small ids and the
log-uniform candidate sampler of the sampled softmax is the right proposal.
Words are kept as bytes: sentences are matched against them byte for byte
(see data.py), so a file that is not valid UTF-8 still reads.
"""

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

    def write(self, path):
        """Writes `word count` lines; the temp-file rename keeps a reader from seeing half a file."""
        console.write_atomically(path, b"".join(
            word + b" " + str(count).encode() + b"\n" for word, count in zip(self.words, self.counts)))


def load(path):
    """Reads a vocabulary file; errors name the file and, for bad lines, the line number."""
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise VocabError(f"{path}: vocabulary file not found") from None
    except IsADirectoryError:
        raise VocabError(f"{path}: vocabulary path is a directory, not a file") from None
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
