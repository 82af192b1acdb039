"""`prepare_data text`: a user's plain text to a corpus `train` reads, as a user runs it (a
subprocess), and what it refuses. About 25 s in all."""
import gzip
import json
import sys

import pytest

from lm1b_hvd.data import dataset, vocab
from lm1b_hvd.data.text_recipe import read_recipe
from tests.helpers import run

LINES = [
    "The U.S. economy grew 2.5% in 2008-09, officials said.",
    "\"I don't know,\" she said.",
    "The   dog   barked.",  # whitespace normalised: the same sentence as the next
    "The dog barked.",
    "",
    "   ",
] + [f"Sentence number {index} is about the dog and the cat." for index in range(200)]


def prepare(args):
    return run([sys.executable, "-m", "lm1b_hvd.prepare_data", "text", *map(str, args)], timeout=120)


@pytest.fixture(scope="module")
def raw_text(tmp_path_factory):
    """Two inputs, one gzipped, with a duplicate across them and a line that is not UTF-8."""
    folder = tmp_path_factory.mktemp("raw")
    (folder / "a.txt").write_bytes("\n".join(LINES[:100]).encode() + b"\n\xff\xfe not utf-8 \xc3\n")
    with gzip.open(folder / "b.txt.gz", "wb") as handle:
        handle.write("\n".join(LINES[100:] + [LINES[0]]).encode() + b"\n")
    return folder


@pytest.fixture(scope="module")
def prepared(raw_text, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("corpus") / "mine"
    result = prepare(["--input", raw_text / "*.txt", raw_text / "b.txt.gz", "--outdir", outdir, "--heldout", 20,
                      "--min_count", 2, "--shards", 3])
    assert result.returncode == 0, result.stderr
    return outdir, result.stdout


def test_text_becomes_a_corpus_in_the_lm1b_layout(prepared):
    outdir, out = prepared
    distinct = len(LINES) - 3  # two blank lines, one repeat after whitespace is normalised
    assert (f"read {len(LINES) + 2:,} lines" in out and f"{distinct:,} sentences; dropped 2 duplicate(s), 2 empty "
            "line(s), 1 line(s) not UTF-8" in out), out
    assert f"training: {distinct - 20:,} sentences" in out and "heldout: 20 sentences" in out
    assert f"corpus ready: --datadir {outdir}" in out

    train, heldout = dataset.find_files(outdir, "train"), dataset.find_files(outdir, "heldout")
    assert len(train) == 3 and len(heldout) == 1
    sentences = [line for path in train + heldout for line in open(path, encoding="utf-8").read().splitlines()]
    assert len(sentences) == len(set(sentences)) == distinct  # every sentence once
    # Moses' rules, as lm1b: punctuation apart, "don 't", a quote a token
    assert "The U.S. economy grew 2.5 % in 2008-09 , officials said ." in sentences
    assert "\" I don 't know , \" she said ." in sentences
    assert "The dog barked ." in sentences
    assert sentences[:len(sentences) - 20] != sorted(sentences[:len(sentences) - 20])  # shuffled

    words = vocab.load(str(outdir / dataset.VOCAB_FILE))
    assert words.words[:2] == [b"<S>", b"<UNK>"] and words.counts[0] == distinct - 20
    counts = words.counts[2:]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 2
    assert words.word_to_id("dog") != words.unk_id

    record = json.loads((outdir / "prepare.json").read_text())
    assert record["recipe"] == {"tokenizer": "moses", "language": "en", "lowercase": False, "unicode_form": "none"}
    assert record["counts"]["heldout_sentences"] == 20 and record["counts"]["undecodable_lines"] == 1
    recipe = read_recipe(str(outdir))
    assert recipe.tokens("Don't stop.") == ["Don", "'t", "stop", "."]
    # and back, as `sample` prints
    assert recipe.text(["\"", "I", "don", "'t", "know", ",", "\"", "she", "said", "."]) == "\"I don't know,\" she said."
    assert not list(outdir.glob(".prepare*"))  # its work folder is gone


def test_the_same_inputs_and_options_give_the_same_bytes(raw_text, prepared, tmp_path):
    outdir, _ = prepared
    again = tmp_path / "again"
    result = prepare(["--input", raw_text / "*.txt", raw_text / "b.txt.gz", "--outdir", again, "--heldout", 20,
                      "--min_count", 2, "--shards", 3, "--workers", 1])
    assert result.returncode == 0, result.stderr
    first = sorted(path.relative_to(outdir) for path in outdir.rglob("*") if path.is_file())
    assert first == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    for name in first:
        assert (outdir / name).read_bytes() == (again / name).read_bytes(), name


def test_lowercase_and_no_tokenizer(raw_text, tmp_path):
    result = prepare(["--input", raw_text / "a.txt", "--outdir", tmp_path / "lower", "--tokenizer", "none",
                      "--lowercase", "--heldout", 0.1, "--min_count", 1])
    assert result.returncode == 0, result.stderr
    text = "".join(open(path).read() for path in dataset.find_files(tmp_path / "lower", "train")
                   + dataset.find_files(tmp_path / "lower", "heldout"))
    assert "the u.s. economy grew 2.5% in 2008-09, officials said.\n" in text  # split on spaces only


@pytest.mark.parametrize("case, expected", [
    ("no match", "error: --input {raw}/none*.txt: matches no file"),
    ("binary", "error: {raw}/binary.txt: a binary file (a NUL byte in its first 8,192 bytes), not text"),
    ("not empty", "error: --outdir {out}: is not empty; prepare_data writes into a new or empty folder only"),
    ("no text", "error: the input holds no text: 3 line(s), all empty or not UTF-8"),
    ("too few", "error: 4 distinct sentence(s) in all: no training sentence (give --heldout a count, or more text)"),
    ("heldout", "error: --heldout 2.5: a fraction between 0 and 1, or a whole count"),
    ("no vocabulary", "error: no word is seen 3 times in the training text: the vocabulary would hold only <S> and "
                      "<UNK> (lower --min_count, or give more text)"),
])
def test_bad_input_is_one_line_and_leaves_nothing_to_read(raw_text, tmp_path, case, expected):
    out = tmp_path / "out"
    inputs, heldout = [raw_text / "a.txt"], 20
    if case == "no match":
        inputs = [raw_text / "none*.txt"]
    elif case == "binary":
        (raw_text / "binary.txt").write_bytes(b"text\0\x01\x02")
        inputs = [raw_text / "binary.txt"]
    elif case == "not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "no text":
        (tmp_path / "blank.txt").write_bytes(b"\n  \n\xff\xff\n")
        inputs = [tmp_path / "blank.txt"]
    elif case == "too few":
        (tmp_path / "few.txt").write_text("one .\ntwo .\nthree .\nfour .\n")
        inputs = [tmp_path / "few.txt"]
    elif case == "heldout":
        heldout = 2.5
    elif case == "no vocabulary":
        (tmp_path / "rare.txt").write_text("".join(f"word{index} other{index}\n" for index in range(30)))
        inputs, heldout = [tmp_path / "rare.txt"], 5
    result = prepare(["--input", *inputs, "--outdir", out, "--heldout", heldout])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == expected.format(raw=raw_text, out=out)
    if case == "not empty":
        assert [path.name for path in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    else:
        assert not out.exists()
