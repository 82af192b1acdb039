"""A checkpoint written on one stack restores on the other, both ways: its weights evaluate alike on
both, and a run continues on the other stack from where it stopped. The other stack's Python is
LM1B_OTHER_STACK_PYTHON (.ci/run runs it on the second stack, the first stack's Python given); without
it the test is skipped, unless LM1B_REQUIRE_OTHER_STACK=1 makes that a failure."""
import os
import re
import sys

import pytest

from tests.helpers import run, train_flags

pytestmark = [pytest.mark.slow, pytest.mark.every_stack]


def other_stack_python():
    python = os.environ.get("LM1B_OTHER_STACK_PYTHON")
    if python:
        return python
    if os.environ.get("LM1B_REQUIRE_OTHER_STACK") == "1":
        pytest.fail("LM1B_OTHER_STACK_PYTHON is not set (the other stack's Python, e.g. .venv/bin/python)")
    pytest.skip("LM1B_OTHER_STACK_PYTHON (the other stack's Python) is not set")


def train_on(python, corpus, logdir, max_steps):
    result = run([python, "-m", "lm1b_hvd.train", *train_flags(corpus, logdir, max_steps=max_steps)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def heldout_perplexity(python, corpus, logdir):
    result = run([python, "-m", "lm1b_hvd.evaluate", "--logdir", logdir, "--datadir", corpus, "--once"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return float(re.findall(r"perplexity ([\d.]+) \|", result.stdout)[-1])


def stack_named(output):
    return re.search(r"lm1b_hvd: 1 rank\(s\), stack (\d+\.\d+) \(TensorFlow ", output).group(1)


def test_a_checkpoint_written_on_either_stack_restores_on_the_other(tiny_corpus, tmp_path):
    here, there = sys.executable, other_stack_python()
    logdir = str(tmp_path / "run")

    written_here = train_on(here, tiny_corpus, logdir, 20)
    assert pytest.approx(heldout_perplexity(here, tiny_corpus, logdir), rel=1e-4) == heldout_perplexity(
        there, tiny_corpus, logdir)

    continued_there = train_on(there, tiny_corpus, logdir, 40)
    assert stack_named(continued_there) != stack_named(written_here)
    assert f"resumed from {logdir}/ckpt-20 at step 20" in continued_there, continued_there[-2000:]

    continued_here = train_on(here, tiny_corpus, logdir, 60)
    assert f"resumed from {logdir}/ckpt-40 at step 40" in continued_here, continued_here[-2000:]
    assert pytest.approx(heldout_perplexity(here, tiny_corpus, logdir), rel=1e-4) == heldout_perplexity(
        there, tiny_corpus, logdir)
