"""`python -m lm1b_hvd.bench`: its figures, alone and under horovodrun, with and without the exchange."""
import json
import re
import sys
import typing

import numpy as np
import pytest

from lm1b_hvd import hparams
from lm1b_hvd.model.cost import parameter_count, table_bytes_per_row, training_flops_per_word
from tests.helpers import horovodrun, run

# A demo-shaped model large enough that its exchange and its matmuls are measurable, on a small
# vocabulary: the bench's flags, the hparams at BENCH[3].
BENCH = ["--preset", "demo", "--hpconfig", "batch_size=8,state_size=64,projected_size=32,emb_size=32,num_sampled=64",
         "--vocab", "500", "--steps", "3", "--warmup", "1"]


def test_flops_per_word_of_the_original_model():
    """DESIGN's cost model: ~82 MFLOP per trained word for LSTM-2048-512 with 8192 candidates."""
    hps = hparams.build("default")
    forward = (512 + 512) * 4 * 2048 + 2048 * 512 + (8192 + 1) * 512
    assert training_flops_per_word(hps, 793_470) == 6 * forward == pytest.approx(81.8e6, rel=1e-3)
    assert training_flops_per_word(hps.replace(num_sampled=0), 1000) == 6 * (forward - 8193 * 512 + 1000 * 512)


def test_big_lstm_has_the_papers_parameters_and_the_factorisations_cut_the_lstm():
    """BIG LSTM: ~1.8B parameters at the lm1b vocabulary (Jozefowicz et al.); F512 and G4 cut
    the gate matrices' parameters and FLOPs to (in + proj + 4 state) x 512 and 1/4."""
    big, f512, g4 = (hparams.build(name) for name in ("big", "big_f512", "big_g4"))
    count = parameter_count(big, 793_470)
    assert count.total == pytest.approx(1.8e9, rel=0.02)
    gates = 2 * (1024 + 1024) * 4 * 8192  # two layers' [in + proj, 4 state]
    assert parameter_count(f512, 793_470).lstm == count.lstm - gates + 2 * (2048 * 512 + 512 * 4 * 8192)
    assert parameter_count(g4, 793_470).lstm == count.lstm - gates + gates // 4
    rest = 2 * 8192 * 1024 + (8192 + 1) * 1024  # projections and the sampled softmax, per word
    assert training_flops_per_word(big, 793_470) == 6 * (gates + rest)
    assert training_flops_per_word(f512, 793_470) == 6 * (2 * (2048 * 512 + 512 * 4 * 8192) + rest)
    assert training_flops_per_word(g4, 793_470) == 6 * (gates // 4 + rest)
    tied = parameter_count(hparams.build("small", "tie_embeddings=true"), 1000)
    assert tied.softmax == 1000 and table_bytes_per_row(hparams.build("small", "tie_embeddings=true")) == 8 * 257


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
    memory_line = stdout.split("peak memory per rank:")[1].split("\n")[0]
    memory = [float(m) for m in re.findall(r"([\d.]+) GiB", memory_line)]
    return Figures(step_ms, words, achieved, peak, best_peak, float(mfu), [float(m) for m in block_mfu.split()],
                   int(blocks), int(steps_per_block), memory)


def test_one_process_prints_consistent_figures():
    result = run([sys.executable, "-m", "lm1b_hvd.bench", *BENCH])
    assert result.returncode == 0, result.stderr[-3000:]
    got = figures(result.stdout)
    hps = hparams.build("demo", BENCH[3])
    assert got.words == pytest.approx(hps.batch_size * hps.num_steps / (got.step_ms / 1e3), rel=0.02)
    flops = training_flops_per_word(hps, 500)
    assert f"model FLOPs per word: {flops / 1e6:,.1f} M" in result.stdout
    assert got.achieved == pytest.approx(got.words * flops / 1e9, rel=0.02, abs=0.05)  # printed to 0.1 GFLOP/s
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


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False])
def test_two_ranks_report_the_exchange_and_every_rank_memory(exchange):
    result = horovodrun(["-m", "lm1b_hvd.bench", *BENCH, *([] if exchange else ["--no_exchange"])])
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


# G-LSTM G2 of the same shapes: the gate matrix halves, the bias and projection stay.
GROUPED_DENSE_MB = ((32 + 32) * 4 * 64 // 2 + 4 * 64 + 64 * 32) * 4 / 1e6


@pytest.mark.slow
def test_g_lstm_allreduces_its_smaller_gradients_and_memory_is_projected_to_lm1b():
    result = horovodrun(["-m", "lm1b_hvd.bench", *BENCH[:3], BENCH[3] + ",lstm_groups=2", *BENCH[4:]])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert traffic(result.stdout)["allreduce"] == pytest.approx((GROUPED_DENSE_MB, GROUPED_DENSE_MB), abs=0.006)
    hps = hparams.build("demo", BENCH[3] + ",lstm_groups=2")
    for vocab in (500, 793_470):
        count = parameter_count(hps, vocab)
        assert f"parameters at vocabulary {vocab:,}: {count.total / 1e6:,.1f} M" in result.stdout
    peak = max(figures(result.stdout).memory)
    projected = float(re.search(r"projected to vocabulary 793,470: ([\d.]+) GiB per rank", result.stdout).group(1))
    assert projected == pytest.approx(peak + 792_970 * table_bytes_per_row(hps) / 2 ** 30, abs=0.011)


@pytest.mark.slow
def test_the_tapes_exchange_is_counted_as_the_original_update_s():
    """grad_combine=tape moves the same tensors through Horovod's own tape."""
    tape = horovodrun(["-m", "lm1b_hvd.bench", *BENCH[:3], BENCH[3] + ",grad_combine=tape", *BENCH[4:]])
    assert tape.returncode == 0, tape.stdout[-3000:] + tape.stderr[-3000:]
    moved = traffic(tape.stdout)
    assert moved["allreduce"] == pytest.approx((DENSE_MB, DENSE_MB), abs=0.006)
    assert 0.01 < moved["allgather"][0] < 0.5


def test_bad_hparam_is_a_one_line_error():
    result = run([sys.executable, "-m", "lm1b_hvd.bench", "--hpconfig", "precision=fp64"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: hparam 'precision' expects one of fp32, bf16, fp16, got 'fp64'")


@pytest.mark.slow
def test_two_level_splits_the_bytes_between_inside_a_node_and_across_nodes():
    """2 nodes x 2 ranks, an outer step every 2 steps: inside a node the step's exchange as ever;
    between nodes each rank's half of every parameter's delta and accumulator, once per outer
    step, of the rows either node changed only; and after it, the other half from the node's
    other rank."""
    args = [*BENCH[:3], BENCH[3] + ",outer_every=2", "--vocab", "500", "--steps", "4", "--warmup", "1"]
    result = horovodrun(["-m", "lm1b_hvd.bench", *args, "--ranks_per_node", "2"], np_=4)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "two-level: 2 nodes x 2 rank(s); every step inside a node, an outer step between nodes every 2 steps" in (
        result.stdout)
    assert re.search(r"outer steps: 2 in the 4 timed steps \(one every 2\), median [\d.]+ ms each; with them, "
                     r"[\d.]+ ms a step", result.stdout)
    inside = dict(re.findall(r"inside a node, (allreduce|allgather): sent ([\d.]+) MB", result.stdout))
    assert float(inside["allreduce"]) == pytest.approx(DENSE_MB, abs=0.006), "the node's ranks allreduce the LSTM"
    parameters = parameter_count(hparams.build("demo", BENCH[3]), 500).total
    per_step = 2 * 4 * parameters / 2 / 2 / 1e6  # deltas and accumulators, fp32, half a node's, every 2nd step
    sent, received, changed = map(float, re.search(
        r"between nodes, outer allreduce: sent ([\d.]+) MB, received ([\d.]+) MB per rank per step \(each outer "
        r"step's / 2; (\d+)% of the rows changed, fp16\)", result.stdout).groups())
    # Not every row changed (the vocabulary's rare words); the LSTM's, wider, all did. In fp16,
    # half the bytes, and a float per row saying which changed.
    assert sent == received and changed < 100 and changed / 100 * per_step / 2 <= sent < per_step / 2 + 0.001
    gathered = re.search(r"inside a node after an outer step, allgather: received ([\d.]+) MB", result.stdout).group(1)
    assert float(gathered) == pytest.approx(per_step, abs=0.0006)


@pytest.mark.slow
def test_an_overlapped_exchange_is_timed_beside_the_steps_and_drawn_as_a_timeline(tmp_path):
    """Under MPI, 2 nodes of 1 rank, accumulators kept per node, 4 bits, the exchange beside the
    next period: the bench says how long each exchange travelled and how the steps beside it
    went, counts what it slowed them by in words/s, and --steps_timeline writes rank 0's steps,
    outer steps and exchanges (each sent at an outer step, arriving after it)."""
    timeline = tmp_path / "timeline.json"
    hpconfig = BENCH[3] + ",outer_every=2,outer_slots=local,outer_bits=4,outer_overlap=true"
    args = [*BENCH[:3], hpconfig, "--vocab", "500", "--steps", "6", "--warmup", "1", "--ranks_per_node", "1",
            "--steps_timeline", str(timeline)]
    result = horovodrun(["-m", "lm1b_hvd.bench", *args], np_=2, controller="--mpi")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = re.sub(r"^\[[\d,]+\]<stdout>:", "", result.stdout, flags=re.M)
    assert "the changed rows sent in 4 bits with error feedback, beside the next period" in out
    median = float(re.search(r"^step time: median ([\d.,]+) ms over 6 steps", out, re.M).group(1))
    with_outer = float(re.search(r"outer steps: 3 in the 6 timed steps \(one every 2\), median [\d.,]+ ms each; "
                                 r"with them, ([\d.,]+) ms a step", out).group(1))
    assert with_outer > median
    words = float(re.search(r"^words/s: ([\d,]+) over 2 rank", out, re.M).group(1).replace(",", ""))
    assert words == pytest.approx(2 * 8 * 20 / (with_outer / 1e3), rel=0.01)  # batch 8 x 20 per rank
    travelled, beside, alone = re.search(
        r"outer exchanges beside the steps: (\d+), median [\d.,]+ ms from send to arrival; steps while one "
        r"travelled: median [\d.,-]+(?: ms)? over (\d+); while none did: median [\d.,]+ ms over (\d+)", out).groups()
    assert int(beside) + int(alone) == 6 and int(travelled) >= 2
    record = json.loads(timeline.read_text())
    assert record["period"] == 2 and len(record["steps"]) == 6 and len(record["outer_steps"]) == 3
    assert all(start < end for start, end in record["steps"] + record["outer_steps"] + record["exchanges"])
    for sent, arrived in record["exchanges"]:
        assert any(start <= sent <= end for start, end in record["outer_steps"])
