import itertools
import math
import multiprocessing
import os

import numpy as np

from lm1b_hvd.data import dataset, demo_corpus, vocab

TINY = demo_corpus.LanguageSpec(num_words=6, num_classes=3, successors=2, start_classes=2,
                                shared_words=0.5, end_prob=(0.3, 0.5), seed=3)


def brute_force_log_prob(language, sentence):
    """Sums P(classes, words) over every class path: no forward algorithm involved."""
    k = len(language.start)
    total = 0.0
    for path in itertools.product(range(k), repeat=len(sentence)):
        p = language.start[path[0]] * language.emission[path[0], sentence[0]]
        for prev, cur, word in zip(path, path[1:], sentence[1:]):
            p *= language.transition[prev, cur] * language.emission[cur, word]
        total += p * language.end[path[-1]]
    return math.log(total)


def read_tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                out[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return out


def test_oracle_matches_brute_force_on_the_heldout_file(tmp_path):
    info = demo_corpus.write_corpus(str(tmp_path / "c"), TINY, train_sentences=300,
                                    heldout_sentences=60, train_files=2)
    language = demo_corpus.HiddenMarkovLanguage.random(TINY)
    index_of = {w.encode(): i for i, w in enumerate(language.words)}
    v = vocab.load(str(tmp_path / "c" / dataset.VOCAB_FILE))
    heldout = dataset.ShardedDataset.for_rank(str(tmp_path / "c"), "heldout", v)
    sentences = [[index_of[v.words[i]] for i in s[1:-1]] for s in heldout.sentences_once()]
    total = sum(brute_force_log_prob(language, s) for s in sentences if len(s) <= 9)
    assert all(len(s) <= 9 for s in sentences), "tiny spec keeps sentences short"
    # The model's evaluation counts one prediction per packed position with w = 1.
    predictions = sum(int(b[2].sum()) for b in dataset.pack_batches(heldout.sentences_once(), 4, 5))
    assert info["heldout_predictions"] == predictions
    assert math.isclose(info["oracle_perplexity"], math.exp(-total / predictions), rel_tol=1e-9)


def test_generator_is_a_proper_distribution():
    language = demo_corpus.HiddenMarkovLanguage.random(TINY)
    assert np.allclose(language.transition.sum(axis=1) + language.end, 1.0)
    assert np.allclose(language.emission.sum(axis=1), 1.0) and math.isclose(language.start.sum(), 1.0)
    # Empirical frequency of one-word sentences against their exact probability.
    rng = np.random.default_rng(0)
    sample = language.sample(20000, rng)
    one_word = {}
    for s in sample:
        if len(s) == 1:
            one_word[s[0]] = one_word.get(s[0], 0) + 1
    assert one_word
    for word, count in one_word.items():
        exact = math.exp(language.sentence_log_prob([word]))
        assert abs(count / len(sample) - exact) < 5 * math.sqrt(exact / len(sample)) + 1e-3
    assert all(s for s in sample) and language.sentence_log_prob([]) == -math.inf


def test_default_corpus_is_deterministic_and_in_range(tmp_path):
    spec = demo_corpus.LanguageSpec()
    a = demo_corpus.write_corpus(str(tmp_path / "a"), spec, 3000, 300, 3)
    b = demo_corpus.write_corpus(str(tmp_path / "b"), spec, 3000, 300, 3)
    c = demo_corpus.write_corpus(str(tmp_path / "c"), demo_corpus.LanguageSpec(seed=1), 3000, 300, 3)
    assert read_tree(tmp_path / "a") == read_tree(tmp_path / "b")
    assert read_tree(tmp_path / "a") != read_tree(tmp_path / "c")
    assert a == b
    assert 20 < a["oracle_perplexity"] < 200 and 20 < c["oracle_perplexity"] < 200
    v = vocab.load(str(tmp_path / "a" / dataset.VOCAB_FILE))
    assert len(v) == spec.num_words + 2


def _ensure(cache):
    return demo_corpus.ensure_demo_corpus(cache, seed=7)


def test_concurrent_ranks_generate_once(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        dirs = pool.map(_ensure, [cache] * 3)
    assert len(set(dirs)) == 1
    assert sorted(os.listdir(cache)) == ["demo-v1-seed7", "demo-v1-seed7.lock"]
    stamp = os.path.getmtime(os.path.join(dirs[0], demo_corpus.ORACLE_FILE))
    assert _ensure(cache) == dirs[0]
    assert os.path.getmtime(os.path.join(dirs[0], demo_corpus.ORACLE_FILE)) == stamp
    assert demo_corpus.read_oracle(dirs[0])["spec"]["seed"] == 7
