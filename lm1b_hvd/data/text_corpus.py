"""Plain text to a corpus in lm1b's layout (`prepare_data text`), in memory that does not grow
with the text.

Two passes, as lm1b itself was made (tokenized, duplicates dropped, shuffled, split):
1. Every line of every input is decoded (a line that is not UTF-8 is skipped and counted),
   tokenized by the TextRecipe on every core, and appended to one of BUCKETS files by the top
   byte of a seeded 64-bit hash of its tokens.
2. Bucket by bucket, in hash order: duplicates dropped (the same tokens have the same hash, so
   they meet in one bucket), the rest sorted by hash, which is a shuffle fixed by the seed, then
   the first sentences to the heldout shard and the others dealt to the training shards; the
   training words are counted for the vocabulary.
Only a bucket and the word counts are in memory at once. Everything is written under a work
folder inside the output folder and moved into place at the end, prepare.json last: a failure
leaves nothing that `train` would read, and nothing of the user's is touched. The same inputs
and options give the same bytes.
"""
import collections
import dataclasses
import glob
import hashlib
import math
import multiprocessing
import os
import shutil

from lm1b_hvd import console
from lm1b_hvd.data import dataset, text_inputs, vocab
from lm1b_hvd.data.text_inputs import STDIN, PrepareError  # noqa: F401 (PrepareError: prepare_data's)
from lm1b_hvd.data.text_recipe import write_recipe

BUCKETS = 256
CHUNK_BYTES = 1 << 20  # lines a worker tokenizes at once
SHARD_BYTES = 64 << 20  # the training text per shard, about


@dataclasses.dataclass(frozen=True)
class Split:
    """How the sentences are shuffled and split: `heldout` a fraction (below 1) or a count of
    sentences; `shards` training shards (0: one per SHARD_BYTES of text); `seed` the shuffle's
    (the key of the sentences' hash)."""
    heldout: float = 0.01
    shards: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class VocabularyRule:
    min_count: int = 3  # lm1b's
    max_vocab: int = 0  # 0: no limit


@dataclasses.dataclass
class Counts:
    """What prepare_data saw and wrote, for prepare.json and its last lines."""
    input_bytes: int = 0
    lines: int = 0
    undecodable_lines: int = 0
    empty_lines: int = 0
    duplicates: int = 0
    training_sentences: int = 0
    heldout_sentences: int = 0
    training_words: int = 0
    heldout_words: int = 0
    vocabulary: int = 0
    out_of_vocabulary_words: int = 0


def input_files(patterns):
    """The inputs the --input patterns name (a path or a glob each, or '-' for standard input,
    once), sorted within a pattern, each once: a TextInput per file, STDIN as it is (it is read
    when the work starts). A pattern that matches nothing, or a file that cannot be read, is
    damaged at its start or is binary, is an error naming it."""
    names = []
    for pattern in patterns:
        if pattern == STDIN:
            if STDIN in names:
                raise PrepareError("--input -: standard input named twice")
            names.append(STDIN)
            continue
        matched = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
        if not matched:
            raise PrepareError(f"--input {pattern}: matches no file"
                               + (" (a folder: name the files in it, or a glob)" if os.path.isdir(pattern) else ""))
        names += [path for path in matched if path not in names]
    return [name if name == STDIN else text_inputs.examine(name) for name in names]


def check_outdir(outdir):
    """The output folder must be new or empty (prepare_data never deletes a user's files), and
    makeable: the nearest folder above it that exists is a folder, and writable."""
    if os.path.exists(outdir) and (not os.path.isdir(outdir) or os.listdir(outdir)):
        raise PrepareError(f"--outdir {outdir}: {'is a file' if not os.path.isdir(outdir) else 'is not empty'}; "
                           "prepare_data writes into a new or empty folder only")
    above = os.path.abspath(outdir)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise PrepareError(f"--outdir {outdir}: cannot be made: {above} is a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise PrepareError(f"--outdir {outdir}: cannot be made: {above} is not writable")


def prepare(inputs, outdir, recipe, split, rule, workers=0, say=console.say):
    """Makes the corpus under `outdir` from `inputs` (input_files') with `workers` tokenizing
    processes (0: one per core); returns its Counts."""
    created = not os.path.exists(outdir)
    os.makedirs(outdir, exist_ok=True)
    work = os.path.join(outdir, ".prepare-work")
    os.makedirs(work)
    try:
        inputs = [text_inputs.examine(text_inputs.copy_standard_input(work), STDIN) if entry == STDIN else entry
                  for entry in inputs]
        counts = Counts(input_bytes=sum(os.path.getsize(entry.path) for entry in inputs))
        buckets = [os.path.join(work, f"bucket-{index:03d}") for index in range(BUCKETS)]
        tokenize_into_buckets(inputs, buckets, recipe, split.seed, workers or os.cpu_count() or 1, counts, say)
        word_counts = split_into_shards(buckets, work, split, counts, say)
        vocabulary = vocab.from_counts(word_counts, counts.training_sentences, rule.min_count, rule.max_vocab)
        if len(vocabulary) <= 2:
            raise PrepareError(f"no word is seen {rule.min_count} times in the training text: the vocabulary would "
                               "hold only <S> and <UNK> (lower --min_count, or give more text)")
        counts.vocabulary = len(vocabulary)
        counts.out_of_vocabulary_words = vocabulary.counts[1]
        vocabulary.write(os.path.join(work, dataset.VOCAB_FILE))
        for name in (dataset.VOCAB_FILE, *{os.path.dirname(p) for p in (dataset.TRAIN_PATTERN,
                                                                      dataset.HELDOUT_PATTERN)}):
            os.replace(os.path.join(work, name), os.path.join(outdir, name))
        write_recipe(outdir, recipe, split=dict(heldout=split.heldout, shards=split.shards),
                     vocabulary=dataclasses.asdict(rule), seed=split.seed,
                     inputs=[os.path.basename(entry.name) for entry in inputs],
                     read=[entry.record() for entry in inputs], counts=dataclasses.asdict(counts),
                     version=_version())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not os.listdir(outdir):  # it failed before anything was moved in
            os.rmdir(outdir)
    return counts


def _version():
    from importlib import metadata
    try:
        return metadata.version("lm1b_hvd")
    except metadata.PackageNotFoundError:
        return "unknown"


# Pass 1: lines to tokens, on every core, into buckets by hash.

def tokenize_into_buckets(inputs, buckets, recipe, seed, workers, counts, say):
    handles = [open(path, "wb") for path in buckets]
    meter = console.Meter("tokenizing", counts.input_bytes, "MB", scale=1e6, report=say)
    done_before = 0
    with multiprocessing.get_context("fork").Pool(workers, _start_worker, (recipe, seed)) as pool:
        pending = collections.deque()
        for text_input in inputs:
            for chunk, position in _chunks(text_input):
                pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
                while len(pending) > 2 * workers:  # at most this many chunks in memory
                    _write_records(pending.popleft().get(), handles, counts)
                meter.update(done_before + position)
            done_before += os.path.getsize(text_input.path)
        while pending:
            _write_records(pending.popleft().get(), handles, counts)
    for handle in handles:
        handle.close()


def _chunks(text_input):
    """(lines, how far into the file on disk) of about CHUNK_BYTES each."""
    chunk, size, position = [], 0, 0
    for line, position in text_inputs.lines(text_input):
        chunk.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield chunk, position
            chunk, size = [], 0
    if chunk:
        yield chunk, position


_worker = {}


def _start_worker(recipe, seed):
    _worker.update(recipe=recipe, key=seed.to_bytes(8, "big"))


def _tokenize_chunk(lines):
    """(records, lines, undecodable, empty): a record is (hash, tokens as bytes) per sentence."""
    recipe, key = _worker["recipe"], _worker["key"]
    records, undecodable, empty = [], 0, 0
    for line in lines:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        tokens = recipe.tokens(text)
        if not tokens:
            empty += 1
            continue
        sentence = " ".join(tokens).encode("utf-8")
        records.append((int.from_bytes(hashlib.blake2b(sentence, digest_size=8, key=key).digest(), "big"), sentence))
    return records, len(lines), undecodable, empty


def _write_records(result, handles, counts):
    records, lines, undecodable, empty = result
    counts.lines += lines
    counts.undecodable_lines += undecodable
    counts.empty_lines += empty
    for hashed, sentence in records:
        handles[hashed >> 56].write(b"%016x %s\n" % (hashed, sentence))


# Pass 2: buckets in hash order to the heldout and training shards.

def split_into_shards(buckets, work, split, counts, say):
    """Writes the shards under `work`; returns the training text's word counts."""
    text_bytes = sum(os.path.getsize(path) for path in buckets)
    shards = split.shards or max(1, min(100, math.ceil(text_bytes / SHARD_BYTES)))
    train_dir = os.path.join(work, os.path.dirname(dataset.TRAIN_PATTERN))
    heldout_dir = os.path.join(work, os.path.dirname(dataset.HELDOUT_PATTERN))
    os.makedirs(train_dir)
    os.makedirs(heldout_dir)
    training = [open(os.path.join(train_dir, f"news.en-{index:05d}-of-{shards:05d}"), "wb") for index in range(shards)]
    heldout = open(os.path.join(heldout_dir, "news.en.heldout-00000-of-00001"), "wb")
    heldout_hash = split.heldout * 2 ** 64 if split.heldout < 1 else None  # a fraction: hashes below it
    word_counts = collections.Counter()
    meter = console.Meter("shuffling and splitting", text_bytes, "MB", scale=1e6, report=say)
    done = 0
    for path in buckets:
        meter.update(done)
        done += os.path.getsize(path)
        with open(path, "rb") as handle:
            records = sorted(set(handle.read().splitlines()))  # "hash sentence": in hash order, each once
        os.remove(path)
        for record in records:
            hashed, sentence = int(record[:16], 16), record[17:]
            words = sentence.split()
            to_heldout = (hashed < heldout_hash if heldout_hash is not None
                          else counts.heldout_sentences < split.heldout)
            if to_heldout:
                heldout.write(sentence + b"\n")
                counts.heldout_sentences += 1
                counts.heldout_words += len(words)
            else:
                training[counts.training_sentences % shards].write(sentence + b"\n")
                counts.training_sentences += 1
                counts.training_words += len(words)
                word_counts.update(words)
    for handle in training + [heldout]:
        handle.close()
    counts.duplicates = counts.lines - counts.undecodable_lines - counts.empty_lines - (
        counts.training_sentences + counts.heldout_sentences)
    if not counts.training_sentences + counts.heldout_sentences:
        raise PrepareError(f"the input holds no text: {counts.lines:,} line(s), all empty or not UTF-8")
    if not counts.training_sentences or not counts.heldout_sentences:
        raise PrepareError(f"{counts.training_sentences + counts.heldout_sentences:,} distinct sentence(s) in all: "
                           f"{'no heldout sentence' if not counts.heldout_sentences else 'no training sentence'} "
                           "(give --heldout a count, or more text)")
    return word_counts
