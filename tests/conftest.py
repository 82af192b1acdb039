"""Shared test helpers: tiny lm1b-layout directories, the real sample's location, running a command."""
import os
import pathlib
import subprocess
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LM1B_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "lm1b-sample"


def run(cmd, timeout=300, env_extra=None, stdin_text=None):
    """A command run from the repository root with the package importable and TensorFlow quiet."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          input=stdin_text)


def write_lm1b_dir(root, train_shards, heldout_shards, vocab_lines):
    """Writes the lm1b layout: lists of file contents (str or bytes) and vocabulary lines."""
    root = pathlib.Path(root)
    train = root / "training-monolingual.tokenized.shuffled"
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train.mkdir(parents=True)
    heldout.mkdir(parents=True)
    for index, text in enumerate(train_shards, start=1):
        _write(train / f"news.en-{index:05d}-of-00100", text)
    for index, text in enumerate(heldout_shards):
        _write(heldout / f"news.en.heldout-{index:05d}-of-00050", text)
    (root / "1b_word_vocab.txt").write_text("".join(line + "\n" for line in vocab_lines))
    return root


def write_tiny_demo_corpus(root):
    """A demo corpus small enough for seconds-long runs (40 words, 400 training sentences)."""
    from lm1b_hvd.data import demo_corpus
    spec = demo_corpus.LanguageSpec(num_words=40, num_classes=4, successors=2, start_classes=2)
    demo_corpus.write_corpus(str(root), spec, train_sentences=400, heldout_sentences=40, train_files=3)
    return root


def _write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


@pytest.fixture
def lm1b_sample():
    if not LM1B_SAMPLE.is_dir():
        pytest.skip(f"the shared lm1b sample is absent ({LM1B_SAMPLE.name} beside the repository)")
    return LM1B_SAMPLE


@pytest.fixture(autouse=True)
def _quiet_tensorflow(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_finish(session):
    """The image tests last, their builds started now in the background (tests/test_container.py)."""
    images = [item for item in session.items if item.nodeid.startswith("tests/test_container.py")]
    if not images or session.config.option.collectonly:
        return
    session.items[:] = [item for item in session.items if item not in images] + images
    from tests import test_container
    test_container.start_builds_in_background(pathlib.Path(tempfile.mkdtemp(prefix="lm1b-images-")))
