"""score, sample and export against the one corpus whose true distribution is known: a small
demo language (40 words) whose generator gives the exact probability of any sentence."""
import dataclasses
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins.projector import ProjectorConfig

from lm1b_hvd.data import demo_corpus
from lm1b_hvd.inference import TrainedModel
from tests.helpers import run
from tests.model_helpers import whole

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

MODEL = "batch_size=32,num_steps=10,emb_size=32,state_size=64,projected_size=32,num_sampled=16"
HELDOUT = "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, logdir, language): 20k training sentences, 2,000 steps (~3.5 epochs), which gets
    within 1% of the oracle perplexity."""
    root = tmp_path_factory.mktemp("using")
    spec = demo_corpus.LanguageSpec(num_words=40, num_classes=4, successors=2, start_classes=2)
    demo_corpus.write_corpus(str(root / "demo"), spec, train_sentences=20_000, heldout_sentences=400, train_files=3)
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--datadir", str(root / "demo"), "--logdir",
                  str(root / "log"), "--preset", "demo", "--hpconfig", MODEL, "--max_steps", "2000",
                  "--log_every", "500", "--eval_every", "1000"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "demo", root / "log", demo_corpus.HiddenMarkovLanguage.random(spec)


def tool(name, corpus, logdir, *args, stdin=None):
    return run([sys.executable, "-m", f"lm1b_hvd.{name}", "--logdir", str(logdir), "--datadir", str(corpus),
                *args], timeout=300, stdin_text=stdin)


def spearman(a, b):
    rank = lambda v: np.argsort(np.argsort(v))
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


def true_log_prob(language, words):
    index = {word: i for i, word in enumerate(language.words)}
    return language.sentence_log_prob([index[w] for w in words])


def test_score_agrees_with_the_generator_and_stream_matches_evaluate(trained, tmp_path):
    corpus, logdir, language = trained
    out = tmp_path / "scores.jsonl"
    result = tool("score", corpus, logdir, "--input", str(corpus / HELDOUT), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sentences, summary = records[:-1], records[-1]["summary"]
    assert len(sentences) == summary["sentences"] == 400
    for record in sentences:
        assert len(record["word_log_probs"]) == record["words"] + 1 == len(record["sentence"].split()) + 1
        assert record["log_prob"] == pytest.approx(sum(record["word_log_probs"]), abs=1e-4)
    truth = [true_log_prob(language, r["sentence"].split()) for r in sentences]
    assert spearman([r["log_prob"] for r in sentences], truth) > 0.9
    oracle = demo_corpus.read_oracle(str(corpus))
    assert summary["predictions"] == oracle["heldout_predictions"]
    assert summary["perplexity"] == pytest.approx(oracle["oracle_perplexity"], rel=0.10)
    assert re.search(r"scored 400 sentences .* [\d,]+ sentences/s \| perplexity", result.stderr)

    stream = tool("score", corpus, logdir, "--input", str(corpus / HELDOUT), "--stream")
    evaluated = run([sys.executable, "-m", "lm1b_hvd.evaluate", "--logdir", str(logdir), "--datadir", str(corpus),
                     "--once"])
    streamed = json.loads(stream.stdout.splitlines()[-1])["summary"]["perplexity"]
    log_perplexity = float(re.search(r"log perplexity ([\d.]+)", evaluated.stdout).group(1))
    assert math.log(streamed) == pytest.approx(log_perplexity, abs=1e-4)


def test_the_model_read_for_use_holds_the_runs_averages_of_its_tables(trained):
    """The demo preset averages its tables (average_tables): score, sample and export read the
    averages, as the trainer's evaluation does, not the last step's rows."""
    corpus, logdir, _ = trained
    model = TrainedModel(str(logdir), str(corpus))
    assert model.hps.average_tables
    reader = tf.train.load_checkpoint(model.path)
    for name, table in model.model.tables.named():
        average = reader.get_tensor(f"tables/{name}/exponential_moving_average")
        np.testing.assert_array_equal(whole(table), average)
        assert np.abs(reader.get_tensor(f"tables/{name}") - average).max() > 1e-4, name


def test_score_reads_stdin_skips_blank_lines_and_counts_unknown_words(trained):
    corpus, logdir, _ = trained
    result = tool("score", corpus, logdir, "--input", "-", stdin="ba bi\n\n   \nzzz ba qqq\n")
    assert result.returncode == 0, result.stderr[-2000:]
    *sentences, summary = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["unk"] for s in sentences] == [0, 2]
    assert summary["summary"]["blank_lines_skipped"] == 2 and summary["summary"]["unk"] == 2


def test_raw_text_in_and_out_through_the_corpuss_recipe(trained, tmp_path):
    """A corpus with a recipe (here: Moses' rules, lowercased) has score and sample tokenize
    what they are given as its text was; --tokenized takes tokens as they are."""
    corpus, logdir, _ = trained
    with_recipe = shutil.copytree(corpus, tmp_path / "with-recipe")
    (with_recipe / "prepare.json").write_text(json.dumps({"recipe": {"tokenizer": "moses", "lowercase": True}}))
    raw = "  BA   Bi  "
    result = tool("score", with_recipe, logdir, "--input", "-", stdin=raw + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    record, summary = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["sentence"] == raw and record["tokens"] == ["ba", "bi"] and record["unk"] == 0
    assert summary["summary"]["tokenized_by"] == "the corpus's recipe"
    as_tokens = tool("score", with_recipe, logdir, "--input", "-", "--tokenized", stdin="ba bi\n")
    assert json.loads(as_tokens.stdout.splitlines()[0])["log_prob"] == record["log_prob"]
    untouched = tool("score", with_recipe, logdir, "--input", "-", "--tokenized", stdin=raw + "\n")
    assert json.loads(untouched.stdout.splitlines()[0])["unk"] == 2  # BA and Bi, as given

    result = tool("sample", with_recipe, logdir, "--prefix", "BA", "--num", "3", "--seed", "5")
    assert result.returncode == 0 and "<UNK>" not in result.stderr, result.stderr[-2000:]
    tokens = tool("sample", with_recipe, logdir, "--prefix", "ba", "--num", "3", "--seed", "5", "--tokenized",
                  "--tokens")
    assert result.stdout == tokens.stdout and all(line.split()[0] == "ba" for line in tokens.stdout.splitlines())
    note = tool("sample", with_recipe, logdir, "--prefix", "BA", "--num", "1", "--tokenized")
    assert "prefix word(s) not in the vocabulary, read as <UNK>: BA" in note.stderr


SMOOTHING = 1e-4


def per_word_true_log_prob(language, words):
    """The empty sentence, which a model may sample (most of all when hot) but the language never
    makes, scores the smoothing's floor instead of minus infinity."""
    if not words:
        return math.log(SMOOTHING)
    return true_log_prob(language, words) / (len(words) + 1)


def smoothed(language, epsilon=SMOOTHING):
    """The generator with every word emittable by every class at a tiny rate, so that a sampled
    sentence the true language cannot produce scores very low instead of minus infinity."""
    emission = (1 - epsilon) * language.emission + epsilon / language.emission.shape[1]
    return dataclasses.replace(language, emission=emission)


def test_samples_look_like_the_language_and_temperature_moves_them(trained):
    corpus, logdir, language = trained
    language = smoothed(language)
    heldout = [line.split() for line in (corpus / HELDOUT).read_text().splitlines()]
    by_length = {}
    for words in heldout:
        by_length.setdefault(len(words), []).append(per_word_true_log_prob(language, words))

    def drawn(temperature, seed=1):
        result = tool("sample", corpus, logdir, "--num", "300", "--temperature", str(temperature), "--seed", str(seed))
        assert result.returncode == 0, result.stderr[-2000:]
        return [line.split() for line in result.stdout.splitlines()]

    samples = drawn(1.0)
    assert samples == drawn(1.0), "same seed, same sentences"
    matched = [(per_word_true_log_prob(language, s), np.mean(by_length[len(s)])) for s in samples if len(s) in by_length]
    model_side, real_side = (np.mean(side) for side in zip(*matched))
    assert model_side == pytest.approx(real_side, rel=0.10)
    mean_true = {t: np.mean([per_word_true_log_prob(language, s) for s in drawn(t)]) for t in (0.5, 2.0)}
    overall = np.mean([per_word_true_log_prob(language, s) for s in samples])
    assert mean_true[0.5] > overall + 0.1 and mean_true[2.0] < overall - 0.1, (mean_true, overall)


def test_export_loads_without_this_package_and_gives_the_numbers_score_gives(trained, tmp_path):
    corpus, logdir, _ = trained
    out = tmp_path / "exported"
    result = tool("export", corpus, logdir, "--out", str(out), "--embeddings", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    sentences = ["ba bi", "ba da do de", "zzz ba", ""]
    scored = tool("score", corpus, logdir, "--input", "-", stdin="\n".join(sentences[:3]) + "\n")
    expected = [json.loads(line)["log_prob"] for line in scored.stdout.splitlines()[:-1]]
    probe = (f"import json, sys, tensorflow as tf\n"
             f"model = tf.saved_model.load({str(out)!r})\n"
             f"scored = model.signatures['score'](sentences=tf.constant({sentences!r}))\n"
             f"nxt = model.signatures['next_word'](prefix=tf.constant(['ba', 'ba da']), k=tf.constant(3))\n"
             f"assert 'lm1b_hvd' not in sys.modules\n"
             f"print(json.dumps({{'log_prob': scored['log_prob'].numpy().tolist(), "
             f"'words': scored['words'].numpy().tolist(), 'next': nxt['words'].numpy().astype(str).tolist(), "
             f"'next_lp': nxt['log_probs'].numpy().tolist()}}))\n")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = json.loads(loaded.stdout.splitlines()[-1])
    np.testing.assert_allclose(got["log_prob"][:3], expected, atol=1e-4)
    assert got["words"] == [2, 4, 2, 0]
    model = TrainedModel(str(logdir), str(corpus))
    for row, prefix in enumerate(["ba", "ba da"]):
        log_probs, _ = model.next_word_log_probs([prefix])
        top = tf.math.top_k(log_probs[0], k=3)
        assert got["next"][row] == [model.vocab.id_to_word(int(i)) for i in top.indices.numpy()]
        np.testing.assert_allclose(got["next_lp"][row], top.values.numpy(), atol=1e-4)
    shown = subprocess.run([str(pathlib.Path(sys.executable).parent / "saved_model_cli"), "show",
                            "--dir", str(out), "--all"], capture_output=True, text=True)
    assert "signature_def['score']" in shown.stdout and "signature_def['next_word']" in shown.stdout


def test_projector_files_are_what_tensorboard_reads(trained, tmp_path):
    corpus, logdir, _ = trained
    assert tool("export", corpus, logdir, "--out", str(tmp_path / "e"), "--embeddings", "25").returncode == 0
    directory = logdir / "projector"
    config = text_format.Parse((directory / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (embedding,) = config.embeddings
    reader = tf.train.load_checkpoint(config.model_checkpoint_path)
    vectors = reader.get_tensor(embedding.tensor_name)
    assert vectors.shape == (25, 32)
    model = TrainedModel(str(logdir), str(corpus))
    np.testing.assert_allclose(vectors, tf.concat(model.model.embedding, 0)[:25].numpy())
    rows = (directory / embedding.metadata_path).read_text().splitlines()
    assert rows[0] == "word\tcount" and len(rows) == 26
    assert rows[1].startswith("<S>\t") and rows[3].split("\t")[0] == model.vocab.id_to_word(2)
    assert list(directory.glob("events.out.tfevents.*")), "an event file, so TensorBoard lists the folder as a run"


@pytest.mark.parametrize("command, setup, message", [
    ("score", "empty input", r"error: .*empty.txt: no sentence to score \(2 blank line\(s\)\)"),
    ("score", "no checkpoint", r"error: .*: no checkpoint here"),
    ("sample", "no hparams", r"error: .*hparams.json: not found; is .* a training log directory\?"),
    ("export", "other vocabulary", r"error: .*hparams.json: 'vocab_size' is \d+ in this log directory but \d+ now; .*"),
    ("evaluate", "a file where the summaries go",
     r"error: .*/eval_test_ave: cannot create the TensorBoard event file \(Not a directory\)"),
])
def test_bad_input_is_one_line(trained, tmp_path, command, setup, message):
    corpus, logdir, _ = trained
    extra = {"score": ["--input", str(tmp_path / "empty.txt")], "sample": [], "export": ["--out", str(tmp_path / "o")],
             "evaluate": ["--once"]}
    (tmp_path / "empty.txt").write_text("\n  \n")
    if setup == "no checkpoint":
        shutil.copytree(logdir, tmp_path / "log", ignore=shutil.ignore_patterns("ckpt-*", "checkpoint"))
        logdir = tmp_path / "log"
    elif setup == "no hparams":
        logdir = tmp_path
    elif setup == "other vocabulary":
        shutil.copytree(corpus, tmp_path / "c")
        with open(tmp_path / "c" / "1b_word_vocab.txt", "a") as vocab:
            vocab.write("extra 1\n")
        corpus = tmp_path / "c"
    elif setup == "a file where the summaries go":  # (another test's evaluate may have made the folder)
        shutil.copytree(logdir, tmp_path / "log", ignore=shutil.ignore_patterns("eval_test_ave"))
        logdir = tmp_path / "log"
        (logdir / "eval_test_ave").write_text("not a folder\n")
    result = tool(command, corpus, logdir, *extra[command])
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.fullmatch(message, result.stderr.strip().splitlines()[-1]), result.stderr[-1000:]
