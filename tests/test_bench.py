"""`python -m lm1b_hvd.bench`: its figures, alone and under horovodrun, with and without the exchange."""
import re
import sys
import typing

import numpy as np
import pytest

from lm1b_hvd import hparams
from lm1b_hvd.model import training_flops_per_word
from tests.conftest import run
from tests.test_multiprocess import horovodrun

TINY = ["--preset", "demo", "--hpconfig", "batch_size=8,state_size=64,projected_size=32,emb_size=32,num_sampled=64",
        "--vocab", "500", "--steps", "3", "--warmup", "1"]


def test_flops_per_word_of_the_original_model():
    """DESIGN's cost model: ~82 MFLOP per trained word for LSTM-2048-512 with 8192 candidates."""
    hps = hparams.build("default")
    forward = (512 + 512) * 4 * 2048 + 2048 * 512 + (8192 + 1) * 512
    assert training_flops_per_word(hps, 793_470) == 6 * forward == pytest.approx(81.8e6, rel=1e-3)
    assert training_flops_per_word(hps.replace(num_sampled=0), 1000) == 6 * (forward - 8193 * 512 + 1000 * 512)


class Figures(typing.NamedTuple):
    step_ms: float
    words: float
    achieved: float  # GFLOP/s
    peak: float  # GFLOP/s, median over blocks, all ranks
    best_peak: float
    mfu: float  # %
    block_mfu: list
    blocks: int
    steps_per_block: int
    memory: list  # GiB per rank


def figures(stdout):
    prefix = r"(?:\[0\]<stdout>:)?"
    step_ms = float(re.search(prefix + r"step time: median ([\d,.]+) ms", stdout).group(1).replace(",", ""))
    words = float(re.search(prefix + r"words/s: ([\d,]+) over (\d+) rank", stdout).group(1).replace(",", ""))
    achieved, peak, best_peak = (float(v.replace(",", "")) for v in re.search(
        r"achieved: ([\d,.]+) GFLOP/s \| matmul peak \(fp32 2048\^3, measured around each block of steps\): "
        r"median ([\d,.]+), best ([\d,.]+) GFLOP/s over \d+ rank\(s\)", stdout).groups())
    mfu, blocks, steps_per_block, block_mfu = re.search(
        r"MFU: ([\d.]+)% \(median over (\d+) block\(s\) of (\d+) step\(s\), each against the peak measured "
        r"around it: ([\d. ]+)\)", stdout).groups()
    memory = [float(m) for m in re.findall(r"([\d.]+) GiB", stdout.split("peak memory per rank:")[1])]
    return Figures(step_ms, words, achieved, peak, best_peak, float(mfu), [float(m) for m in block_mfu.split()],
                   int(blocks), int(steps_per_block), memory)


def test_one_process_prints_consistent_figures():
    result = run([sys.executable, "-m", "lm1b_hvd.bench", *TINY])
    assert result.returncode == 0, result.stderr[-3000:]
    got = figures(result.stdout)
    hps = hparams.build("demo", TINY[3])
    assert got.words == pytest.approx(hps.batch_size * hps.num_steps / (got.step_ms / 1e3), rel=0.02)
    flops = training_flops_per_word(hps, 500)
    assert f"model FLOPs per word: {flops / 1e6:,.1f} M" in result.stdout
    assert got.achieved == pytest.approx(got.words * flops / 1e9, rel=0.02)
    # The 3 timed steps in blocks, each block's MFU against the peak measured around it.
    assert got.blocks == len(got.block_mfu) and (got.blocks - 1) * got.steps_per_block < 3 <= got.blocks * got.steps_per_block
    assert got.mfu == pytest.approx(float(np.median(got.block_mfu)), abs=0.11)
    assert 1.0 < got.peak <= got.best_peak
    assert got.mfu == pytest.approx(100 * got.achieved / got.peak, rel=0.5), "MFU is achieved over peak"
    assert len(got.memory) == 1 and 0.1 < got.memory[0] < 8
    assert not traffic(result.stdout), "one process exchanges nothing"


def traffic(stdout):
    """{kind: (sent MB, received MB)} of the bench's exchange lines."""
    return {kind: (float(sent), float(received)) for kind, sent, received in re.findall(
        r"(allreduce|allgather|alltoall): sent ([\d.]+) MB, received ([\d.]+) MB per rank per step", stdout)}


# The demo-shaped LSTM's dense gradients: weight (32 + 32) x 4 x 64, bias 4 x 64, projection 64 x 32 floats.
DENSE_MB = ((32 + 32) * 4 * 64 + 4 * 64 + 64 * 32) * 4 / 1e6


@pytest.mark.parametrize("exchange", [True, False])
def test_two_ranks_report_the_exchange_and_every_rank_memory(exchange):
    result = horovodrun(["-m", "lm1b_hvd.bench", *TINY, *([] if exchange else ["--no_exchange"])])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    memory = figures(result.stdout).memory
    assert re.search(r"words/s: [\d,]+ over 2 rank\(s\) \(160 words per rank per step\)", result.stdout)
    assert len(memory) == 2, "peak memory of each rank"
    moved = traffic(result.stdout)
    if not exchange:
        assert not moved and "exchange off" in result.stdout
        return
    # The dense LSTM gradients are allreduced whole; the embedding and softmax rows allgathered:
    # what a rank sends (its unique rows) and receives (the other rank's) are of a size.
    assert moved["allreduce"] == pytest.approx((DENSE_MB, DENSE_MB), abs=0.006)
    sent, received = moved["allgather"]
    assert 0.01 < sent < 0.5 and received == pytest.approx(sent, rel=0.5)
    assert "alltoall" not in moved, "the replicated vocabulary moves no rows by alltoall"
    assert re.search(r"summing duplicate rows before the exchange saved [\d.]+ MB per rank per step", result.stdout)


def test_the_tapes_exchange_is_counted_as_the_original_update_s():
    """grad_combine=tape moves the same tensors through Horovod's own tape."""
    tape = horovodrun(["-m", "lm1b_hvd.bench", *TINY[:3], TINY[3] + ",grad_combine=tape", *TINY[4:]])
    assert tape.returncode == 0, tape.stdout[-3000:] + tape.stderr[-3000:]
    moved = traffic(tape.stdout)
    assert moved["allreduce"] == pytest.approx((DENSE_MB, DENSE_MB), abs=0.006)
    assert 0.01 < moved["allgather"][0] < 0.5


def test_bad_hparam_is_a_one_line_error():
    result = run([sys.executable, "-m", "lm1b_hvd.bench", "--hpconfig", "precision=fp64"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: hparam 'precision' expects one of fp32, bf16, fp16, got 'fp64'")
