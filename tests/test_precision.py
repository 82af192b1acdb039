"""Mixed precision and XLA train the demo preset as well as fp32 does, step for step."""
import re
import sys

import pytest

from tests.helpers import run

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

STEPS = 300
# Half the demo's batch: fp16 has no fast CPU kernels, and its run is most of the module's time.
SHAPE = "batch_size=16"


def heldout_perplexity(tmp_path, hpconfig):
    logdir = tmp_path / (hpconfig.replace("=", "-").replace(",", "_") or "fp32")
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--logdir", str(logdir), "--max_steps", str(STEPS),
                  "--eval_steps", "20", "--log_every", "50", "--hpconfig", ",".join(filter(None, [SHAPE, hpconfig]))],
                 timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"precision={hpconfig.split('=')[1] if 'precision' in hpconfig else 'fp32'}" in result.stdout
    return float(re.search(rf"step {STEPS} \| heldout perplexity ([\d.]+)", result.stdout).group(1))


@pytest.fixture(scope="module")
def fp32_perplexity(tmp_path_factory):
    return heldout_perplexity(tmp_path_factory.mktemp("fp32"), "")


@pytest.mark.parametrize("hpconfig", ["precision=bf16", "precision=fp16", "xla=true", "precision=bf16,xla=true"])
def test_mode_reaches_the_fp32_perplexity_in_the_same_steps(tmp_path, fp32_perplexity, hpconfig):
    perplexity = heldout_perplexity(tmp_path, hpconfig)
    print(f"{hpconfig}: heldout perplexity {perplexity:.2f} after {STEPS} steps, fp32 {fp32_perplexity:.2f}")
    assert 1.0 < fp32_perplexity < 400.0, "the fp32 run learned something in the first place"
    assert perplexity == pytest.approx(fp32_perplexity, rel=0.03), (hpconfig, perplexity, fp32_perplexity)
