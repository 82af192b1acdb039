"""`train --init_from`: a new run on another corpus starts from a trained run's weights, word by
word, replicated and vocabulary-parallel (2 ranks, from a 1-rank run); and what it refuses.
About 60 s."""
import json
import shutil

import numpy as np
import pytest

from tests.helpers import TINY, run, saved_variables as saved, train_command

pytestmark = pytest.mark.slow

FROZEN = TINY + ",learning_rate=1e-9"  # one step that leaves the weights where --init_from put them
SOURCE_STEPS = 20
LSTM = ("lstm_weights", "lstm_biases", "lstm_projections")  # in the order the averages keep them
TABLES = ("embedding", "softmax_b")


def train(corpus, logdir, steps, hpconfig, *extra, ranks=1):
    """The run's result, whether it succeeded or not."""
    return run(train_command(corpus, logdir, *extra, max_steps=steps, hpconfig=hpconfig, ranks=ranks), timeout=300)


def words(corpus):
    return [line.split()[0] for line in (corpus / "1b_word_vocab.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def source(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("init-from")
    corpus = tiny_corpus
    result = train(corpus, root / "source", SOURCE_STEPS, TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    # Another domain: the same text, but its vocabulary lacks the source's two rarest words and
    # has two of its own.
    domain = shutil.copytree(corpus, root / "domain")
    lines = (corpus / "1b_word_vocab.txt").read_text().splitlines()
    (domain / "1b_word_vocab.txt").write_text("\n".join(lines[:-2] + ["newword1 1", "newword2 1"]) + "\n")
    return corpus, root / "source", domain


def test_a_new_run_starts_from_the_trained_weights_word_by_word(source, tmp_path):
    corpus, source_logdir, domain = source
    tuned, fresh, parallel = tmp_path / "tuned", tmp_path / "fresh", tmp_path / "parallel"
    result = train(domain, tuned, 1, FROZEN, "--init_from", source_logdir)
    assert result.returncode == 0, result.stderr[-3000:]
    total = len(words(domain))
    assert (f"initialised from {source_logdir}/ckpt-{SOURCE_STEPS}: the LSTM and the rows of {total - 2} of this "
            f"vocabulary's {total} words (in both vocabularies); 2 new word(s) start as in a fresh run; Adagrad's "
            "accumulators, the averages, the step and the learning rate start fresh") in result.stdout
    assert "starting from scratch" not in result.stdout
    assert train(domain, fresh, 1, FROZEN).returncode == 0
    result = train(domain, parallel, 1, FROZEN + ",vocab_parallel=true", "--init_from", source_logdir / "best",
                   ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]

    was, now, new = saved(source_logdir, SOURCE_STEPS), saved(tuned, 1), saved(fresh, 1)
    # The source's weights as evaluation reads them: its averages.
    for index, name in enumerate(LSTM):
        np.testing.assert_allclose(now[f"model/{name}/0/.ATTRIBUTES/VARIABLE_VALUE"],
                                   was[f"ema_shadows/{index}/.ATTRIBUTES/VARIABLE_VALUE"], atol=1e-6, err_msg=name)
    source_row = {word: row for row, word in enumerate(words(corpus))}
    for table in TABLES:
        for row, word in enumerate(words(domain)):
            expected = (was[f"tables/{table}/exponential_moving_average"][source_row[word]] if word in source_row
                        else new[f"tables/{table}"][row])  # a new word: as in a fresh run
            np.testing.assert_allclose(now[f"tables/{table}"][row], expected, atol=1e-6, err_msg=f"{table} {word}")
    assert now["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == 1  # the step starts again

    # Vocabulary-parallel on 2 ranks, from the 1-rank run's best checkpoint: the same start.
    assert json.loads((source_logdir / "best" / "best.json").read_text())["step"] == SOURCE_STEPS
    shared = [row for row, word in enumerate(words(domain)) if word in source_row]
    for table in TABLES:
        np.testing.assert_allclose(saved(parallel, 1)[f"tables/{table}"][shared], now[f"tables/{table}"][shared],
                                   atol=1e-6, err_msg=table)

    # Run again, the run resumes its own checkpoint and says --init_from is not used.
    result = train(domain, tuned, 2, FROZEN, "--init_from", source_logdir)
    assert result.returncode == 0 and (f"--init_from {source_logdir} not used: the run resumes its own checkpoint"
                                       in result.stdout), result.stderr[-3000:]


@pytest.mark.parametrize("case", ["shape", "not a run", "no vocabulary copy"])
def test_a_source_it_cannot_start_from_is_one_line_and_nothing_is_written(source, tmp_path, case):
    corpus, source_logdir, domain = source
    hpconfig, init_from = TINY, source_logdir
    if case == "shape":
        hpconfig = TINY.replace("state_size=16", "state_size=32")
        expected = (f"error: --init_from {source_logdir}: hparam 'state_size' is 16 there but 32 here; the model's "
                    "shape must be the same")
    elif case == "not a run":
        init_from = tmp_path / "nothing"
        init_from.mkdir()
        expected = f"error: --init_from {init_from}: not a training run (no hparams.json in {init_from})"
    else:
        init_from = shutil.copytree(source_logdir, tmp_path / "older")
        (init_from / "1b_word_vocab.txt").unlink()
        expected = (f"error: --init_from {init_from}: {init_from} has no copy of its vocabulary (1b_word_vocab.txt; "
                    "runs keep one since this option exists): copy its corpus's vocabulary file there")
    result = train(domain, tmp_path / "new", 1, hpconfig, "--init_from", init_from)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == expected, result.stderr[-2000:]
    assert not (tmp_path / "new").exists()
