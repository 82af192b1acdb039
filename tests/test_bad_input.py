"""Bad input to the trainer, each from the command line as a user would give it: one line on
stderr naming the file, line or key at fault, a non-zero exit, and every file already in the
log directory left exactly as it was."""
import re
import shutil
import sys

import pytest

from tests.helpers import TINY, run, snapshot, train, train_command

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

VOCAB = "1b_word_vocab.txt"


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A corpus and a log directory holding a 3-step run's checkpoints."""
    logdir = tmp_path_factory.mktemp("bad-input") / "log"
    train(tiny_corpus, logdir, max_steps=3)
    return tiny_corpus, logdir


def corpus_copy(corpus, destination, edit_vocab=None, drop_train=False):
    shutil.copytree(corpus, destination)
    if edit_vocab:
        path = destination / VOCAB
        path.write_text(edit_vocab(path.read_text().splitlines()))
    if drop_train:
        shutil.rmtree(destination / "training-monolingual.tokenized.shuffled")
    return destination


def vocabulary_as_directory(corpus, destination):
    corpus_copy(corpus, destination)
    (destination / VOCAB).unlink()
    (destination / VOCAB).mkdir()
    return destination


def file_instead_of(destination):
    destination.write_text("not a directory\n")
    return destination


def lines(items):
    return "".join(item + "\n" for item in items)


CASES = {
    "malformed vocabulary line": (
        lambda c, t: dict(corpus=corpus_copy(c, t / "c", lambda v: lines(v[:2] + ["w1 many"] + v[3:]))),
        r"error: {corpus}/1b_word_vocab.txt:3: expected 'word count', got 'w1 many'"),
    "vocabulary without <S>": (
        lambda c, t: dict(corpus=corpus_copy(c, t / "c", lambda v: lines(x for x in v if not x.startswith("<S> ")))),
        r"error: {corpus}/1b_word_vocab.txt: vocabulary has no <S> entry"),
    "vocabulary without <UNK>": (
        lambda c, t: dict(corpus=corpus_copy(c, t / "c", lambda v: lines(x for x in v if not x.startswith("<UNK> ")))),
        r"error: {corpus}/1b_word_vocab.txt: vocabulary has no <UNK> entry"),
    "vocabulary size differs from the checkpoint's": (
        lambda c, t: dict(corpus=corpus_copy(c, t / "c", lambda v: lines(v + ["extra 1"]))),
        r"error: {logdir}/hparams.json: 'vocab_size' is (\d+) in this log directory but (\d+) now; "
        r"use a new --logdir or the same settings"),
    "datadir that does not exist": (
        lambda c, t: dict(corpus=t / "nowhere"),
        r"error: {corpus}/1b_word_vocab.txt: vocabulary file not found"),
    "datadir that is a file": (
        lambda c, t: dict(corpus=file_instead_of(t / "data-file")),
        r"error: {corpus}: the data directory is a file; --datadir takes a directory in the lm1b layout "
        r"\(1b_word_vocab.txt and the shard folders\)"),
    "vocabulary file that is a directory": (
        lambda c, t: dict(corpus=vocabulary_as_directory(c, t / "c")),
        r"error: {corpus}/1b_word_vocab.txt: vocabulary path is a directory, not a file"),
    "datadir without shards": (
        lambda c, t: dict(corpus=corpus_copy(c, t / "c", drop_train=True)),
        r"error: {corpus}: no train files matching training-monolingual.tokenized.shuffled/news.en-\*-of-\*"),
    "unknown hpconfig key": (
        lambda c, t: dict(hpconfig=TINY + ",state_sise=3"),
        r"error: unknown hparam 'state_sise' \(known: .*\)"),
    "ill-typed hpconfig value": (
        lambda c, t: dict(hpconfig=TINY + ",batch_size=lots"),
        r"error: hparam 'batch_size' expects an int, got 'lots'"),
    "vocab_parallel with --elastic": (
        lambda c, t: dict(hpconfig=TINY + ",vocab_parallel=true", extra=["--elastic"]),
        r"error: --elastic cannot be used with vocab_parallel=true: an elastic reset would have to re-shard the "
        r"vocabulary's rows over the new ranks, which this trainer does not do; drop one of the two"),
    "outer_every with --elastic": (
        lambda c, t: dict(hpconfig=TINY + ",outer_every=4", extra=["--elastic"]),
        r"error: --elastic cannot be used with outer_every=4: an elastic reset would have to re-form the nodes and "
        r"their outer state, which this trainer does not do; drop one of the two"),
    "ranks_per_node that does not divide the ranks": (
        lambda c, t: dict(hpconfig=TINY + ",outer_every=4", extra=["--ranks_per_node", "2"]),
        r"error: outer_every=4: --ranks_per_node 2 does not divide the 1 ranks"),
    "vocab_parallel with sparse_as_dense": (
        lambda c, t: dict(hpconfig=TINY + ",vocab_parallel=true,sparse_as_dense=true"),
        r"error: hparam 'vocab_parallel' cannot be combined with sparse_as_dense=true: .+"),
    "non-numeric flag": (
        lambda c, t: dict(extra=["--max_steps", "ten"]),
        r"error: argument --max_steps: invalid int value: 'ten' \(see python -m lm1b_hvd.train --help\)"),
    "negative step timeout": (
        lambda c, t: dict(extra=["--step_timeout", "-5"]),
        r"error: argument --step_timeout: must be at least 0.0, got '-5' \(see python -m lm1b_hvd.train --help\)"),
    "a time that is not a number": (
        lambda c, t: dict(extra=["--max_time", "nan"]),
        r"error: argument --max_time: must be a finite number, got 'nan' \(see python -m lm1b_hvd.train --help\)"),
    "no checkpoint to keep": (
        lambda c, t: dict(extra=["--keep_checkpoints", "0"]),
        r"error: argument --keep_checkpoints: must be at least 1, got '0' \(see python -m lm1b_hvd.train --help\)"),
    "profile window backwards": (
        lambda c, t: dict(extra=["--profile_steps", "5,2"]),
        r"error: argument --profile_steps: expects FIRST,LAST with 0 <= FIRST <= LAST, got '5,2' "
        r"\(see python -m lm1b_hvd.train --help\)"),
    "log directory under a file": (
        lambda c, t: dict(logdir=t / "a-file", logdir_below="sub"),
        r"error: {logdir}/run.lock: cannot open the run's lock file \(Not a directory\); the log directory must be "
        r"writable"),
    "log directory that is a file": (
        lambda c, t: dict(logdir=t / "a-file"),
        r"error: {logdir}: the log directory is a file"),
    "corrupt hparams.json": (
        lambda c, t: dict(corrupt=("hparams.json", b'{"batch_size": 4,')),
        r"error: {logdir}/hparams.json: unreadable \(.*\); is it a file this trainer wrote\?"),
    "corrupt checkpoint index": (
        lambda c, t: dict(corrupt=("ckpt-3.index", b"not an index" * 20)),
        r"error: {logdir}: none of its 1 checkpoint\(s\) restores \(ckpt-3\); the files are kept as they are: "
        r"repair them, or train into another --logdir"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_a_non_zero_exit_and_no_damage(trained, tmp_path, case):
    corpus, base_logdir = trained
    make, expected = CASES[case]
    setup = make(corpus, tmp_path)
    logdir = setup.get("logdir") or tmp_path / "log"
    if not setup.get("logdir"):
        shutil.copytree(base_logdir, logdir)
    else:
        logdir.write_text("I am a file\n")
    file_in_the_way = logdir
    if "logdir_below" in setup:
        logdir = logdir / setup["logdir_below"]
    if "corrupt" in setup:
        name, content = setup["corrupt"]
        (logdir / name).write_bytes(content)
    # run.lock is rewritten by every run that takes the directory, refused or not: it names the
    # last holder, and holds nothing of the run's
    before = snapshot(logdir, but=("run.lock",))
    result = run(train_command(setup.get("corpus", corpus), logdir, *setup.get("extra", []), max_steps=6,
                               hpconfig=setup.get("hpconfig", TINY)))
    assert result.returncode != 0
    stderr = result.stderr.strip().splitlines()
    assert stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    pattern = expected.format(corpus=re.escape(str(setup.get("corpus", corpus))), logdir=re.escape(str(logdir)))
    assert re.fullmatch(pattern, stderr[-1]), stderr[-1]
    assert snapshot(logdir, but=("run.lock",)) == before, "files already in the log directory were changed"
    if file_in_the_way.is_file():
        assert file_in_the_way.read_text() == "I am a file\n"


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--temperature", "inf"], ["--seed", "-1"],
                                   ["--num", "0"]])
def test_sample_refuses_its_flags_out_of_range_before_reading_a_model(tmp_path, flags):
    """Each is argparse's one line and exit 2, before the log directory is looked at."""
    result = run([sys.executable, "-m", "lm1b_hvd.sample", "--logdir", str(tmp_path / "none"), *flags], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --num and --max_words must be >= 1, --temperature a finite number > 0, --top_k and --seed >= 0 "
        "(see python -m lm1b_hvd.sample --help)")
