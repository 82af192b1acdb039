"""Real `horovodrun -np 2` processes: the update equals the original's 2-tower step, and a
training run, its resumption and the separate evaluator work end to end."""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from lm1b_hvd.data import demo_corpus
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from tests.helpers import TINY, horovodrun, run, scalars, train_command
from tests.model_helpers import sampled_softmax_losses
from tests.workers import broadcast, equivalence as eq


def original_two_tower_update(steps):
    """The original trainer's update, in one process with numpy: per tower loss x num_steps,
    embedding grads x batch_size, LSTM grads clipped per tower; dense averaged, sparse summed;
    TF1 Adagrad (accumulator 1.0); EMA of the LSTM weights."""
    hps = eq.HPS
    model = LSTMPLanguageModel(hps, eq.VOCAB)
    variables = model.all_variables
    n_emb, n_lstm = len(model.embedding), len(model.lstm_variables)
    accumulators = [np.ones(v.shape, np.float64) for v in variables]
    shadows = [v.numpy().astype(np.float64) for v in model.lstm_variables]
    towers = [eq.tower_batches(t) for t in range(2)]
    states = [model.zero_state(hps.batch_size) for _ in range(2)]
    for step in range(steps):
        per_tower = []
        for tower in range(2):
            model.candidate_sampler = eq.fixed_sampler(tower)
            x, y, w = towers[tower][step]
            with tf.GradientTape() as tape:
                outputs, states[tower] = model.forward(x, states[tower], training=False)
                loss = tf.reduce_mean(sampled_softmax_losses(model, outputs, y) * w) * hps.num_steps
            grads = tape.gradient(loss, variables)
            emb = [tf.convert_to_tensor(g).numpy() * hps.batch_size for g in grads[:n_emb]]
            lstm, _ = tf.clip_by_global_norm(grads[n_emb:n_emb + n_lstm], hps.max_grad_norm)
            softmax = [tf.convert_to_tensor(g).numpy() for g in grads[n_emb + n_lstm:]]
            per_tower.append(emb + [g.numpy() for g in lstm] + softmax)
        combined = []
        for i in range(len(variables)):
            pair = [per_tower[0][i], per_tower[1][i]]
            is_dense = n_emb <= i < n_emb + n_lstm
            combined.append((pair[0] + pair[1]) / 2 if is_dense else pair[0] + pair[1])
        for var, acc, grad in zip(variables, accumulators, combined):
            acc += grad.astype(np.float64) ** 2
            var.assign((var.numpy() - hps.learning_rate * grad / np.sqrt(acc)).astype(np.float32))
        for shadow, var in zip(shadows, model.lstm_variables):
            shadow -= (1 - hps.ema_decay) * (shadow - var.numpy())
    return [v.numpy() for v in variables] + shadows


def test_two_ranks_apply_the_original_two_tower_update(tmp_path):
    result = horovodrun(["-m", "tests.workers.equivalence", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    names = [k for k in ranks[0].files if k.startswith("arr_")]
    assert int(ranks[0]["step"]) == eq.STEPS
    reference = original_two_tower_update(eq.STEPS)
    assert len(reference) == len(names)
    for name, expected in zip(names, reference):
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=f"{name} differs between ranks")
        assert np.max(np.abs(ranks[0][name] - expected)) < 1e-5, name
    moved = [np.max(np.abs(ranks[0][n] - r)) for n, r in zip(names, original_two_tower_update(0))]
    assert max(moved) > 1e-3, "the steps changed the weights"


def test_every_rank_gets_rank_0s_state(tmp_path):
    result = horovodrun(["-m", "tests.workers.broadcast", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = broadcast.rank_values(0)
    assert not np.array_equal(expected[0], broadcast.rank_values(1)[0])
    for rank in range(2):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        for index, value in enumerate(expected):
            np.testing.assert_array_equal(saved[f"arr_{index}"], value, err_msg=f"rank {rank}, variable {index}")


REPORT_OFTEN = ["--log_every", 2, "--summary_every", 2, "--checkpoint_steps", 3]


@pytest.mark.slow
def test_run_resume_and_separate_evaluator(tmp_path, tiny_corpus):
    logdir = tmp_path / "log"

    def train_mpi(*extra, max_steps):
        return run(train_command(tiny_corpus, logdir, *REPORT_OFTEN, *extra, max_steps=max_steps, ranks=2,
                                 controller="--mpi"))

    first = train_mpi("--profile_steps", "2,4", max_steps=6)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 rank(s)" in first.stdout and "starting from scratch" in first.stdout
    tagged_mid_line = [line for line in first.stdout.splitlines() if re.search(r".\[\d+,\d+\]<std", line)]
    assert not tagged_mid_line, "each line reaches mpirun in one write"
    assert re.search(r"device rank 0: \S+ CPU \(\d+ threads\)\n.*device rank 1: \S+ CPU", first.stdout)
    assert "horovod: 0.28.1, MPI controller, gradients exchanged with MPI (on the CPU)" in first.stdout
    progress = re.findall(r"step (\d+) \| loss ([\d.]+) \| ([\d,]+) words/s \| elapsed", first.stdout)
    assert [int(p[0]) for p in progress] == [2, 4, 6], "rank 0 alone prints, every 2 steps"
    assert "stopped at step 6 (max_steps)" in first.stdout
    first_eval = float(re.search(r"step 6 \| heldout perplexity ([\d.]+)", first.stdout).group(1))
    assert 1.0 < first_eval < 60.0
    assert tf.train.latest_checkpoint(str(logdir)).endswith("ckpt-6")
    assert json.loads((logdir / "hparams.json").read_text())["state_size"] == 16
    traces = [name for _, _, files in os.walk(logdir / "profile") for name in files]
    assert any(name.endswith(".xplane.pb") for name in traces), "profiler trace of steps 2-4"
    train_scalars = scalars(logdir / "train")
    for tag in ("loss", "perplexity", "words_per_sec", "lstm_grad_norm", "clip_scale", "weight_norm",
                "learning_rate"):
        assert sorted(train_scalars[tag]) == [2, 4, 6], tag
    assert scalars(logdir / "eval")["eval/perplexity"][6] == pytest.approx(first_eval, rel=1e-3)

    second = train_mpi(max_steps=10)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {logdir}/ckpt-6 at step 6" in second.stdout
    assert [int(s) for s in re.findall(r"step (\d+) \| loss", second.stdout)] == [8, 10]
    assert tf.train.latest_checkpoint(str(logdir)).endswith("ckpt-10")
    assert os.path.exists(logdir / "ckpt-9.index"), "periodic checkpoint every 3 steps"
    second_eval, words = re.search(r"step 10 \| heldout perplexity ([\d.]+) over (\d+) words",
                                   second.stdout).groups()
    second_eval = float(second_eval)
    # Both ranks' shares of the heldout shard, summed: every heldout prediction counted once.
    assert int(words) == demo_corpus.read_oracle(str(tiny_corpus))["heldout_predictions"]

    evaluated = run([sys.executable, "-m", "lm1b_hvd.evaluate", "--logdir", str(logdir), "--datadir",
                     str(tiny_corpus), "--mode", "eval_test_ave", "--once"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    match = re.search(r"eval_test_ave step 10 \| perplexity ([\d.]+)", evaluated.stdout)
    assert f"| {words} words |" in evaluated.stdout
    # One process reads the sentences in another order into its rows than two ranks do, so the
    # carried LSTM state differs at sentence starts: close, not equal.
    one_process = float(match.group(1))
    assert one_process == pytest.approx(second_eval, rel=2e-2)
    summaries = scalars(logdir / "eval_test_ave")
    assert summaries["eval/perplexity"][10] == pytest.approx(one_process, rel=1e-3)
    assert summaries["eval/log_perplexity"][10] == pytest.approx(np.log(one_process), rel=1e-3)


@pytest.mark.slow
def test_resume_with_other_model_shape_is_refused_and_keeps_checkpoints(tmp_path, tiny_corpus):
    logdir = tmp_path / "log"
    assert run(train_command(tiny_corpus, logdir, max_steps=3)).returncode == 0
    before = sorted(os.listdir(logdir))
    result = run(train_command(tiny_corpus, logdir, max_steps=6, hpconfig=TINY.replace("state_size=16",
                                                                                        "state_size=32")))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {logdir}/hparams.json: 'state_size' is 16 in this log directory but 32 now; "
        "use a new --logdir or the same settings")
    assert sorted(os.listdir(logdir)) == before


@pytest.mark.parametrize("args, message", [
    (["--hpconfig", "state_sise=3"], "error: unknown hparam 'state_sise'"),
    (["--datadir", "/nonexistent-lm1b"], "error: /nonexistent-lm1b/1b_word_vocab.txt: vocabulary file not found"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message):
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--logdir", str(tmp_path / "log"), *args])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.slow
def test_default_preset_the_original_lstm_2048_512_trains_and_evaluates(tmp_path, tiny_corpus):
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--datadir", str(tiny_corpus),
                  "--logdir", str(tmp_path / "log"), "--hpconfig", "batch_size=8",
                  "--max_steps", "2", "--log_every", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_shards=8,num_layers=1" in result.stdout and "state_size=2048,projected_size=512" in result.stdout
    assert [int(s) for s in re.findall(r"step (\d+) \| loss", result.stdout)] == [1, 2]
    assert re.search(r"step 2 \| heldout perplexity [\d.]+ over \d+ words", result.stdout)


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path, tiny_corpus):
    logdir = tmp_path / "log"
    result = run(train_command(tiny_corpus, logdir, "--checkpoint_steps", 1, max_steps=20,
                               hpconfig=TINY + ",learning_rate=1e30"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: training loss is nan at step (\d+); last checkpoint kept", last)
    assert match, last
    nan_step = int(match.group(1))
    assert nan_step > 1, "the first step is finite; the huge learning rate breaks the weights"
    assert tf.train.latest_checkpoint(str(logdir)).endswith(f"ckpt-{nan_step - 1}")


def corpus_with_heldout(tiny_corpus, destination, heldout_text):
    """A copy of the tiny corpus whose heldout shard is one file holding `heldout_text`."""
    shutil.copytree(tiny_corpus, destination)
    heldout_dir = destination / "heldout-monolingual.tokenized.shuffled"
    shutil.rmtree(heldout_dir)
    heldout_dir.mkdir()
    (heldout_dir / "news.en.heldout-00000-of-00050").write_text(heldout_text)
    return destination


@pytest.mark.slow
def test_a_rank_without_heldout_lines_adds_nothing_and_no_heldout_at_all_is_an_error(tmp_path, tiny_corpus):
    words = [line.split()[0] for line in (tiny_corpus / "1b_word_vocab.txt").read_text().splitlines()]
    sentence = " ".join(w for w in words if not w.startswith("<"))[:5 * 8]
    one_line = corpus_with_heldout(tiny_corpus, tmp_path / "one", sentence + "\n")
    result = run(train_command(one_line, tmp_path / "a", *REPORT_OFTEN, max_steps=2, ranks=2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Rank 0 holds the one line (its n words make n + 1 predictions); rank 1's share is empty.
    assert "step 2 | heldout perplexity" in result.stdout
    assert f"over {len(sentence.split()) + 1} words" in result.stdout

    blank = corpus_with_heldout(tiny_corpus, tmp_path / "blank", "\n  \n")
    logdir = tmp_path / "b"
    result = run(train_command(blank, logdir, *REPORT_OFTEN, max_steps=2, ranks=2))
    assert result.returncode != 0
    assert (f"error: no sentences in {blank}: the heldout files "
            f"(heldout-monolingual.tokenized.shuffled/news.en.heldout-*-of-*), on any rank") in result.stdout + result.stderr
    assert tf.train.latest_checkpoint(str(logdir)).endswith("ckpt-2"), "the final step is saved before evaluating"
