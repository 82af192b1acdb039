"""The tests' fixtures: the tiny corpus every trained run shares, the real lm1b sample, quiet
TensorFlow, and the image builds started first (their helpers and the rest: tests/helpers.py)."""
import os
import pathlib
import tempfile

import pytest

from tests import images
from tests.helpers import LM1B_SAMPLE, write_tiny_demo_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The tiny demo corpus (helpers.write_tiny_demo_corpus), made once: runs only read it."""
    return write_tiny_demo_corpus(tmp_path_factory.mktemp("tiny-corpus") / "demo")


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
    """The image tests last, their builds started now in the background (tests/images.py)."""
    image_tests = [item for item in session.items if item.nodeid.startswith("tests/test_container.py")]
    if not image_tests or session.config.option.collectonly:
        return
    session.items[:] = [item for item in session.items if item not in image_tests] + image_tests
    images.start_builds_in_background(pathlib.Path(tempfile.mkdtemp(prefix="lm1b-images-")))
