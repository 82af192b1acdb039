"""The real One Billion Word benchmark: download, check, extract safely, build the vocabulary.

The vocabulary is built like the original's: every word of the training
shards seen at least `min_count` times (3 gives about 793k entries), most
frequent first, plus `<S>` (count: training sentences) and `<UNK>` (count:
tokens of rarer words).
"""
import collections
import hashlib
import os
import tarfile
import urllib.request

from lm1b_hvd import console
from lm1b_hvd.data import dataset, text_recipe, vocab

DEFAULT_URL = ("http://www.statmt.org/lm-benchmark/"
               "1-billion-word-language-modeling-benchmark-r13output.tar.gz")
ARCHIVE_ROOT = "1-billion-word-language-modeling-benchmark-r13output"


class DownloadError(console.UserError):
    """A download, archive or layout that cannot be used."""


def download(url, path, expected_sha256=None, chunk_bytes=1 << 20):
    """Fetches `url` to `path` (via a .part file), checking length and optional SHA-256."""
    part = path + ".part"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as out:
            expected_length = response.headers.get("Content-Length")
            meter = console.Meter(f"download {os.path.basename(path)}", int(expected_length or 0), "MB", scale=1e6)
            received = 0
            while chunk := response.read(chunk_bytes):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                meter.update(received)
    except OSError as err:
        raise DownloadError(f"{url}: download failed: {err}") from None
    if expected_length is not None and received != int(expected_length):
        os.remove(part)
        raise DownloadError(f"{url}: got {received} bytes, expected {expected_length}")
    if expected_sha256 and digest.hexdigest() != expected_sha256.lower():
        os.remove(part)
        raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match {expected_sha256}")
    os.replace(part, path)
    return digest.hexdigest()


def _checked_members(archive, archive_path, target):
    """Every member, refusing links, devices and paths that leave `target`."""
    root = os.path.realpath(target)
    for member in archive.getmembers():
        if not (member.isfile() or member.isdir()):
            raise DownloadError(f"{archive_path}: member '{member.name}' is a link or special file; refused")
        destination = os.path.realpath(os.path.join(root, member.name))
        if os.path.isabs(member.name) or os.path.commonpath([root, destination]) != root:
            raise DownloadError(f"{archive_path}: member '{member.name}' points outside {target}; refused")
        yield member


def extract(archive_path, target):
    """Extracts a .tar.gz into `target` after checking every member first."""
    os.makedirs(target, exist_ok=True)
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            members = list(_checked_members(archive, archive_path, target))
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(target, members=members, **options)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DownloadError(f"{archive_path}: not a readable tar archive: {err}") from None


def build_vocabulary(datadir, min_count=3):
    """Counts the training shards of `datadir` into a Vocabulary."""
    counts = collections.Counter()
    sentences = 0
    paths = dataset.find_files(datadir, "train")
    meter = console.Meter("vocabulary count", sum(os.path.getsize(p) for p in paths), "MB", scale=1e6)
    counted = 0
    for path in paths:
        meter.update(counted)
        counted += os.path.getsize(path)
        with open(path, "rb") as handle:
            for line in handle:
                tokens = line.split()
                if tokens:
                    sentences += 1
                    counts.update(tokens)
    return vocab.from_counts(counts, sentences, min_count)


def fetch_lm1b(outdir, url=DEFAULT_URL, expected_sha256=None, min_count=3, keep_archive=False):
    """Downloads and prepares lm1b under `outdir`; returns the data directory for --datadir."""
    os.makedirs(outdir, exist_ok=True)
    archive_path = os.path.join(outdir, os.path.basename(url.rstrip("/")) or "lm1b.tar.gz")
    if not os.path.exists(archive_path):
        download(url, archive_path, expected_sha256)
    extract(archive_path, outdir)
    datadir = os.path.join(outdir, ARCHIVE_ROOT)
    if not os.path.isdir(datadir):
        raise DownloadError(f"{archive_path}: no {ARCHIVE_ROOT}/ directory inside")
    dataset.find_files(datadir, "heldout")
    build_vocabulary(datadir, min_count).write(os.path.join(datadir, dataset.VOCAB_FILE))
    # lm1b's text was tokenized by Moses' rules: score and sample take and give plain text through them.
    text_recipe.write_recipe(datadir, text_recipe.TextRecipe(), source=url)
    if not keep_archive:
        os.remove(archive_path)
    return datadir

