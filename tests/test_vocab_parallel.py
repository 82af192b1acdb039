"""The vocabulary sharded over real `horovodrun` ranks (vocab_parallel): it applies the update of
the replicated trainer (same seeds, same data, dropout on, every variable within 1e-5 after 30
steps) and its checkpoints hold the same logical matrices as the replicated one's. That it
resumes exactly is held by test_two_level's stopped-and-resumed case: its vocabulary-parallel
nodes save their tables and slots in parts and resume them exactly so."""
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import (DROPOUT, assert_same_variables, horovodrun, run, saved_variables, scalars, train,
                           train_command, without_run_position)
from tests.workers import vocab_parallel as worker

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

STEPS = 30


# Tied embeddings: the softmax's rows are the embedding's, fetched from and sent back to one owner;
# each rank averages the rows it holds.
TIED = ("tie_embeddings=true,emb_size=6,emb_keep_prob=0.7,variational_dropout=true,recurrent_keep_prob=0.8,"
        "average_tables=true")


# Each rank count and each way of combining gradients once (the rank count changes how the rows
# are sharded, which is the same in either way), and tied embeddings.
@pytest.mark.parametrize("ranks, grad_combine, overrides", [pytest.param(2, "tape", "", marks=pytest.mark.every_stack),
                                                            (4, "rank_clip", ""), (2, "rank_clip", TIED)])
def test_sharded_vocabulary_gives_the_replicated_update(tmp_path, ranks, grad_combine, overrides):
    result = horovodrun(["-m", "tests.workers.vocab_parallel", str(tmp_path), grad_combine, str(STEPS), overrides],
                        np_=ranks, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    covered = {name: [] for name in (("emb", "softmax_b") if overrides else ("emb", "softmax_w", "softmax_b"))}
    for rank in range(ranks):
        replicated, sharded = (np.load(tmp_path / f"{kind}{rank}.npz") for kind in ("replicated", "sharded"))
        for name in replicated.files:
            if name.endswith("_rows"):
                continue
            table, kind, _ = name.partition("_slot") if "_slot" in name else name.partition("_average")
            if table in covered:
                first, stop = sharded[f"{table}_rows"]
                expected = replicated[name][first:stop]
                if not kind:
                    covered[name].append((first, stop))
            else:
                expected = replicated[name]
            np.testing.assert_allclose(sharded[name], expected, rtol=0, atol=1e-5, err_msg=f"rank {rank}: {name}")
        assert np.abs(replicated["emb_slot"] - 1.0).max() > 1e-3, "the steps changed the tables' slots"
        if "average_tables=true" in overrides:
            assert np.abs(replicated["emb_average"] - replicated["emb"]).max() > 1e-4, "the average lags the rows"
    for name, shares in covered.items():
        assert sorted(shares)[0][0] == 0 and sorted(shares)[-1][1] == worker.VOCAB, name
        assert all(a[1] == b[0] for a, b in zip(sorted(shares), sorted(shares)[1:])), f"{name}: every row once"


# Checkpoints across modes and rank counts, exact resume and bad input: the trainer from the
# command line, as a user runs it.
VOCAB_PARALLEL = DROPOUT + ",vocab_parallel=true"
RUN_STEPS = 6


def train_run(corpus, logdir, hpconfig, ranks, max_steps=RUN_STEPS):
    """Trains (or, at max_steps, only restores, saves and evaluates) and returns stdout."""
    return train(corpus, logdir, max_steps=max_steps, hpconfig=hpconfig, ranks=ranks)


def final_eval_perplexity(logdir):
    """The last eval/perplexity the run wrote to TensorBoard, at full precision."""
    by_step = scalars(logdir / "eval")["eval/perplexity"]
    return by_step[max(by_step)]


def copy_run(source, destination):
    """The run's checkpoints and hparams, without its TensorBoard events."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("eval", "train"))
    return destination


def test_a_checkpoint_resumes_in_either_mode_on_any_rank_count_with_the_same_weights(tiny_corpus, tmp_path):
    """4 vocabulary-parallel ranks write a checkpoint; 4 replicated, 2 vocabulary-parallel, 2
    replicated and 1 rank resume it in turn, each saving it again at the same step: every saved
    variable stays the same, and the final evaluation of the same rank count agrees to 1e-5."""
    chain = [(4, VOCAB_PARALLEL), (4, DROPOUT), (2, VOCAB_PARALLEL), (2, DROPOUT),
             (1, DROPOUT)]
    first = tmp_path / "0"
    train_run(tiny_corpus, first, chain[0][1], chain[0][0])
    original = without_run_position(saved_variables(first, RUN_STEPS))
    assert any(name.startswith("tables/embedding") for name in original)
    perplexities, previous = {chain[0]: final_eval_perplexity(first)}, first
    for index, (ranks, hpconfig) in enumerate(chain[1:], start=1):
        logdir = copy_run(previous, tmp_path / str(index))
        out = train_run(tiny_corpus, logdir, hpconfig, ranks)
        assert f"resumed from {logdir}/ckpt-{RUN_STEPS} at step {RUN_STEPS}" in out
        assert_same_variables(original, without_run_position(
            saved_variables(logdir, RUN_STEPS)))
        perplexities[ranks, hpconfig] = final_eval_perplexity(logdir)
        previous = logdir
    for ranks in (4, 2):
        assert perplexities[ranks, VOCAB_PARALLEL] == pytest.approx(perplexities[ranks, DROPOUT], rel=1e-5)

    # A checkpoint the vocabulary-parallel ranks wrote reads as any other in evaluate.
    evaluated = [run([sys.executable, "-m", "lm1b_hvd.evaluate", "--logdir", str(logdir), "--datadir", str(tiny_corpus),
                      "--once"]) for logdir in (first, tmp_path / "1")]
    assert all(result.returncode == 0 for result in evaluated), evaluated[0].stderr[-2000:]
    assert [result.stdout.split(" | ")[1] for result in evaluated][0].startswith("perplexity ")
    assert evaluated[0].stdout.split(" | ")[1:3] == evaluated[1].stdout.split(" | ")[1:3]


def test_fewer_vocabulary_rows_than_ranks_is_one_line_and_writes_nothing(tiny_corpus, tmp_path):
    corpus = tmp_path / "c"
    shutil.copytree(tiny_corpus, corpus)
    vocab = corpus / "1b_word_vocab.txt"
    kept = [line for line in vocab.read_text().splitlines() if line.split()[0] in ("<S>", "</S>", "<UNK>")]
    vocab.write_text("".join(line + "\n" for line in kept))
    logdir = tmp_path / "log"
    result = run(train_command(corpus, logdir, max_steps=3, hpconfig=VOCAB_PARALLEL, ranks=4), timeout=300)
    assert result.returncode != 0
    assert (f"error: vocab_parallel=true needs at least one vocabulary row per rank: {len(kept)} row(s) for 4 ranks"
            in result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("error: vocab_parallel")[0]
    assert not logdir.exists()
