"""lm1b shards -> per-rank sentence streams -> `(x, y, w)` batches.

Input rules, decided once here:
- Files are read as bytes. Tokens are separated by ASCII whitespace and looked
  up byte for byte in the vocabulary, so invalid UTF-8 never stops a run: such
  a token is `<UNK>` unless the vocabulary holds exactly those bytes.
- A blank (or whitespace-only) line is not a sentence and is skipped; an empty
  file contributes nothing. A rank left with no training sentence is an error;
  a rank's empty share of the heldout shard is not, as long as some rank has one.
- A sentence of n words becomes `<S> w1 .. wn <S>`: n + 1 predictions.

Batches follow the original trainer: each of the `batch_size` rows is its own
stream of sentences laid back to back, so row r of one batch continues where
row r of the previous batch stopped, and the LSTM state of that row can be
carried over. `y` is `x` shifted by one along the stream; `w` is 1 where a
prediction is real and 0 in the padding after the data ran out.
"""
import dataclasses
import glob
import os
import queue
import threading

import numpy as np

from lm1b_hvd import console

TRAIN_PATTERN = "training-monolingual.tokenized.shuffled/news.en-*-of-*"
HELDOUT_PATTERN = "heldout-monolingual.tokenized.shuffled/news.en.heldout-*-of-*"
VOCAB_FILE = "1b_word_vocab.txt"
SPLITS = {"train": TRAIN_PATTERN, "heldout": HELDOUT_PATTERN}


class DataError(console.UserError):
    """Data files that are missing or unusable."""


@dataclasses.dataclass(frozen=True)
class FilePart:
    """Lines `offset, offset + stride, ...` of one file (stride 1: the whole file)."""
    path: str
    offset: int = 0
    stride: int = 1


def check_datadir(datadir):
    """A --datadir that exists must be a directory (a missing one is named by the vocabulary's error)."""
    if os.path.exists(datadir) and not os.path.isdir(datadir):
        raise DataError(f"{datadir}: the data directory is a file; --datadir takes a directory in the lm1b layout "
                        f"({VOCAB_FILE} and the shard folders)")


def find_files(datadir, split):
    """The sorted shard files of `split` ('train' or 'heldout') under `datadir`."""
    pattern = os.path.join(datadir, SPLITS[split])
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise DataError(f"{datadir}: no {split} files matching {SPLITS[split]}")
    return paths


def parts_for_rank(paths, rank, num_ranks):
    """The disjoint share of `paths` that rank `rank` of `num_ranks` reads.

    With at least as many files as ranks, files are dealt round-robin; with
    fewer, every rank reads every file but only its own lines, so no sentence
    is seen twice per epoch across ranks either way.
    """
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} outside 0..{num_ranks - 1}")
    if len(paths) >= num_ranks:
        return [FilePart(path) for path in paths[rank::num_ranks]]
    return [FilePart(path, offset=rank, stride=num_ranks) for path in paths]


def read_sentences(part, vocab):
    """The sentences of one file part as int32 arrays `<S> ids <S>` (Vocabulary.sentence_ids)."""
    with open(part.path, "rb") as handle:
        lines = handle.read().splitlines()
    sentences = []
    for line in lines[part.offset::part.stride]:
        tokens = line.split()
        if tokens:
            sentences.append(vocab.sentence_ids(tokens))
    return sentences


class BatchPacker:
    """Lays sentences back to back in `batch_size` rows and cuts [batch_size, num_steps] batches.

    `rows` holds each row's unfinished sentence (an empty array when none): with the reader's
    position, what a checkpoint needs to continue the same stream."""

    def __init__(self, batch_size, num_steps, rows=None):
        self.num_steps = num_steps
        self.rows = [np.asarray(r, np.int32) for r in rows] if rows else [np.zeros(0, np.int32)] * batch_size
        if len(self.rows) != batch_size:
            raise ValueError(f"{len(self.rows)} unfinished rows for a batch of {batch_size}")

    def next_batch(self, sentences):
        """The next `(x, y, w)` from the iterator `sentences`, or None when no row got any data."""
        batch_size, num_steps = len(self.rows), self.num_steps
        x = np.zeros((batch_size, num_steps), np.int32)
        y = np.zeros((batch_size, num_steps), np.int32)
        w = np.zeros((batch_size, num_steps), np.float32)
        for row in range(batch_size):
            filled = 0
            while filled < num_steps:
                current = self.rows[row]
                if len(current) < 2:
                    current = next(sentences, None)
                    if current is None:
                        break
                take = min(len(current) - 1, num_steps - filled)
                x[row, filled:filled + take] = current[:take]
                y[row, filled:filled + take] = current[1:take + 1]
                w[row, filled:filled + take] = 1.0
                self.rows[row] = current[take:]
                filled += take
        return (x, y, w) if w.any() else None


def pack_batches(sentences, batch_size, num_steps):
    """Packs an iterator of sentences into `(x, y, w)` batches of [batch_size, num_steps].

    Stops after the first batch in which no row got any data.
    """
    sentences = iter(sentences)
    packer = BatchPacker(batch_size, num_steps)
    while (batch := packer.next_batch(sentences)) is not None:
        yield batch


@dataclasses.dataclass
class StreamPosition:
    """Where one rank's endless training stream stands, enough to continue it exactly: the
    epoch (whose file order is drawn from the stream's seed and the epoch), the file within
    that order, the sentence within the file's order (drawn from seed, epoch and file), and
    each batch row's unfinished sentence."""
    epoch: int = 0
    file_index: int = 0
    sentence_index: int = 0
    rows: tuple = ()  # per batch row, the word ids still to be read ([] for none)

    def to_dict(self):
        return {"epoch": self.epoch, "file_index": self.file_index, "sentence_index": self.sentence_index,
                "rows": [[int(i) for i in row] for row in self.rows]}

    @classmethod
    def from_dict(cls, record):
        return cls(int(record["epoch"]), int(record["file_index"]), int(record["sentence_index"]),
                   tuple(tuple(row) for row in record["rows"]))


class ShardedDataset:
    """The sentences one rank reads from a list of file parts."""

    def __init__(self, parts, vocab, source=""):
        if not parts:
            raise DataError("no data files assigned to this rank")
        self.parts = list(parts)
        self.vocab = vocab
        self.source = source or ", ".join(part.path for part in self.parts)  # for messages

    @classmethod
    def for_rank(cls, datadir, split, vocab, rank=0, num_ranks=1):
        return cls(parts_for_rank(find_files(datadir, split), rank, num_ranks), vocab,
                   source=f"{datadir}: the {split} files ({SPLITS[split]})")

    def _no_sentences(self):
        names = ", ".join(part.path for part in self.parts)
        return DataError(f"no sentences in {names}")

    def sentences_once(self, allow_empty=False):
        """Every sentence once, in file order: deterministic, for evaluation.

        `allow_empty` is for a rank's share of a shard summed over ranks, where
        another rank may hold the only lines."""
        seen_any = False
        for part in self.parts:
            for sentence in read_sentences(part, self.vocab):
                seen_any = True
                yield sentence
        if not seen_any and not allow_empty:
            raise self._no_sentences()

    def sentences_forever(self, seed, position=None):
        """Endless epochs from `position` (mutated as it goes); each epoch shuffles the file order
        and the sentences within each file, from `seed`, the epoch and the file's place alone."""
        position = position or StreamPosition()
        while True:
            whole_epoch, seen_any = position.file_index == 0 and position.sentence_index == 0, False
            files = np.random.default_rng([*seed, position.epoch]).permutation(len(self.parts))
            while position.file_index < len(files):
                sentences = read_sentences(self.parts[files[position.file_index]], self.vocab)
                seen_any = seen_any or bool(sentences)
                order = np.random.default_rng([*seed, position.epoch, position.file_index]).permutation(
                    len(sentences))
                while position.sentence_index < len(order):
                    position.sentence_index += 1
                    yield sentences[order[position.sentence_index - 1]]
                position.file_index, position.sentence_index = position.file_index + 1, 0
            if whole_epoch and not seen_any:
                raise self._no_sentences()
            position.epoch, position.file_index = position.epoch + 1, 0

    def iterate_forever(self, batch_size, num_steps, seed, position=None):
        """Endless `(x, y, w, position)`: each batch with the StreamPosition just after it."""
        position = dataclasses.replace(position) if position else StreamPosition()
        packer = BatchPacker(batch_size, num_steps, position.rows)
        sentences = self.sentences_forever(seed, position)
        while True:
            x, y, w = packer.next_batch(sentences)
            position.rows = tuple(tuple(row) for row in packer.rows)
            yield x, y, w, dataclasses.replace(position)


def prefetch(iterator, depth=4):
    """Runs `iterator` on a background thread, `depth` items ahead, so shard reading and packing
    overlap the training step. Its exceptions (a DataError, say) are raised here, unchanged."""
    items = queue.Queue(maxsize=depth)
    done = object()

    def fill():
        try:
            for item in iterator:
                items.put((item, None))
            items.put((done, None))
        except Exception as err:  # handed to the consumer, which raises it
            items.put((done, err))

    threading.Thread(target=fill, daemon=True, name="batch-prefetch").start()
    while True:
        item, error = items.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item
