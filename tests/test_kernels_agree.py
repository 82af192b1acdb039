"""The code path a GPU runs (`kernels=portable`: TensorFlow ops only, weights as stored) trains the
demo preset on this CPU to the numbers of the CPU kernels' path (`kernels=cpu`)."""
import os
import re
import sys

import pytest
import tensorflow as tf

from lm1b_hvd.model import cpu_kernels
from tests.helpers import run

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

STEPS = 300
needs_the_cpu_kernels = pytest.mark.skipif(
    not cpu_kernels.built() or bool(tf.config.list_physical_devices("GPU")),
    reason="kernels=cpu needs a CPU install's kernels and no GPU (a GPU install builds none)")


def train(tmp_path, kernels):
    logdir = tmp_path / kernels
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--logdir", str(logdir), "--max_steps", str(STEPS),
                  "--summary_every", "1", "--log_every", "100", "--hpconfig", f"kernels={kernels}"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"compute plan: kernels={kernels} (asked for" in result.stdout
    losses = {}
    event_dir = logdir / "train"
    for name in os.listdir(event_dir):
        for event in tf.compat.v1.train.summary_iterator(str(event_dir / name)):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    perplexity = float(re.search(rf"step {STEPS} \| heldout perplexity ([\d.]+)", result.stdout).group(1))
    return [losses[step] for step in range(1, 21)], perplexity, result.stdout


@needs_the_cpu_kernels
def test_portable_and_cpu_kernels_train_the_demo_alike(tmp_path):
    portable_losses, portable_perplexity, portable_log = train(tmp_path, "portable")
    cpu_losses, cpu_perplexity, cpu_log = train(tmp_path, "cpu")
    assert "LSTM cell composed, sampled softmax composed, per-step weights stored" in portable_log
    assert "LSTM cell fused, sampled softmax fused" in cpu_log
    print(f"heldout perplexity after {STEPS} steps: portable {portable_perplexity:.3f}, cpu {cpu_perplexity:.3f}; "
          f"largest relative loss difference in steps 1-20: "
          f"{max(abs(a - b) / b for a, b in zip(portable_losses, cpu_losses)):.2e}")
    assert portable_losses[0] > portable_losses[-1], "the first 20 steps learn something"
    assert portable_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert portable_perplexity == pytest.approx(cpu_perplexity, rel=0.005)
