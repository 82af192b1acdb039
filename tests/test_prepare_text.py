"""`prepare_data text`: a user's plain text to a corpus `train` reads, as a user runs it (a
subprocess), and what it refuses. About 25 s in all."""
import bz2
import gzip
import json
import lzma
import sys

import numpy as np
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


def corpus_files(outdir):
    """A corpus's shards and vocabulary: what the same text must give byte for byte."""
    return {path.relative_to(outdir): path.read_bytes() for path in sorted(outdir.rglob("*"))
            if path.is_file() and path.name != "prepare.json"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A few kilobytes of text and its corpus."""
    folder = tmp_path_factory.mktemp("plain")
    text = "\n".join(LINES) + "\n"
    (folder / "plain.txt").write_text(text, encoding="utf-8")
    result = prepare(["--input", folder / "plain.txt", "--outdir", folder / "corpus", "--heldout", 20])
    assert result.returncode == 0, result.stderr
    return folder, text, corpus_files(folder / "corpus")


@pytest.mark.parametrize("form", ["gz", "bz2", "xz", "standard input", "utf-8 with a mark", "utf-16"])
def test_compressed_marked_and_piped_text_gives_the_plain_corpus(plain, tmp_path, form):
    """The same text compressed (gzip, bzip2, xz), on standard input, with a UTF-8 mark (dropped,
    not a word) or in UTF-16 gives the plain file's corpus, and prepare.json says what was read."""
    folder, text, expected = plain
    writers = {"gz": lambda data: gzip.compress(data), "bz2": bz2.compress, "xz": lzma.compress,
               "standard input": lambda data: data, "utf-8 with a mark": lambda data: b"\xef\xbb\xbf" + data}
    data = text.encode("utf-16") if form == "utf-16" else writers[form](text.encode("utf-8"))
    path = tmp_path / ("text.txt" + (f".{form}" if form in ("gz", "bz2", "xz") else ""))
    path.write_bytes(data)
    piped = form == "standard input"
    result = run([sys.executable, "-m", "lm1b_hvd.prepare_data", "text", "--input", "-" if piped else str(path),
                  "--outdir", str(tmp_path / "corpus"), "--heldout", "20"], timeout=120,
                 stdin_text=text if piped else None)
    assert result.returncode == 0, result.stderr
    assert corpus_files(tmp_path / "corpus") == expected
    read = json.loads((tmp_path / "corpus" / "prepare.json").read_text())["read"]
    assert read == [{"input": "-" if piped else path.name,
                     "compression": {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}.get(form, "none"),
                     "encoding": form if form.startswith("utf") else "utf-8", "bytes": len(data)}]


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_damaged_compressed_input_is_one_line_or_the_right_corpus(plain, tmp_path, capsys, monkeypatch,
                                                                   compression):
    """Truncations and byte flips of a compressed file: each is one line naming the file (exit
    1, nothing left behind) or, where the damage falls where the format does not look, the plain
    corpus; never a traceback. In-process (prepare_data.main), to try many in seconds."""
    from lm1b_hvd import prepare_data
    folder, text, expected = plain
    monkeypatch.chdir(tmp_path)
    whole = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compression](text.encode("utf-8"))
    rng = np.random.default_rng(0)
    damaged = [whole[:size] for size in (1, 5, len(whole) // 2, len(whole) - 1)]
    for position in rng.choice(len(whole), 8, replace=False):
        flipped = bytearray(whole)
        flipped[position] ^= 0xFF
        damaged.append(bytes(flipped))
    refused = 0
    for index, data in enumerate(damaged):
        path, outdir = tmp_path / f"damaged{index}.txt.{compression}", tmp_path / f"corpus{index}"
        path.write_bytes(data)
        status = prepare_data.main(["text", "--input", str(path), "--outdir", str(outdir), "--heldout", "20",
                                    "--workers", "1"])
        err = capsys.readouterr().err
        if status == 0:
            assert corpus_files(outdir) == expected, f"damage {index} gave another corpus"
            continue
        refused += 1
        assert status == 1 and err.count("\n") == 1 and not outdir.exists(), err
        assert err.startswith(f"error: {path}: ") and ("ends early" in err or "is damaged" in err), err
    assert refused >= 8  # every truncation, and most flips


@pytest.mark.parametrize("case, expected", [
    ("negative workers", "error: --workers -1: must be 0 or more and at most 1,024"),
    ("heldout between counts", "error: --heldout 1.5: a fraction between 0 and 1, or a whole count"),
    ("too many shards", "error: --shards 5000: must be 0 or more and at most 1,000"),
    ("outdir under a file", "error: --outdir {tmp}/a-file/corpus: cannot be made: {tmp}/a-file is a file"),
    ("a folder as input", "error: --input {tmp}: matches no file (a folder: name the files in it, or a glob)"),
    ("standard input twice", "error: --input -: standard input named twice"),
    ("utf-16 broken", "error: {tmp}/broken.txt: not UTF-16 after its byte-order mark (truncated data); convert it "
                      "to UTF-8 first: iconv -f UTF-16 -t UTF-8 IN > OUT"),
])
def test_options_and_odd_inputs_are_checked_first(plain, tmp_path, case, expected):
    """Each is one line naming the option or the file, exit 1, and no output folder."""
    folder, _, _ = plain
    inputs, flags = [folder / "plain.txt"], []
    (tmp_path / "a-file").write_text("mine")
    outdir = tmp_path / ("a-file/corpus" if case == "outdir under a file" else "corpus")
    flags = {"negative workers": ["--workers", -1], "heldout between counts": ["--heldout", 1.5],
             "too many shards": ["--shards", 5000]}.get(case, [])
    if case == "a folder as input":
        inputs = [tmp_path]
    elif case == "standard input twice":
        inputs = ["-", "-"]
    elif case == "utf-16 broken":
        (tmp_path / "broken.txt").write_bytes("a line of text .\n".encode("utf-16") * 50 + b"\x00")
        inputs = [tmp_path / "broken.txt"]
    result = prepare(["--input", *inputs, "--outdir", outdir, *flags])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [expected.format(tmp=tmp_path)]
    assert not outdir.exists() and (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("command, expected", [
    (["demo", "--seed", "-3"], "error: --seed -3: must be 0 or more"),
    (["lm1b", "--outdir", "{tmp}/lm1b", "--min_count", "0"], "error: --min_count 0: must be 1 or more"),
])
def test_the_other_commands_check_their_numbers_first(tmp_path, command, expected):
    result = run([sys.executable, "-m", "lm1b_hvd.prepare_data", *[part.format(tmp=tmp_path) for part in command]],
                 timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [expected], result.stderr
    assert not (tmp_path / "lm1b").exists()
