import collections
import json
import sys

import numpy as np
import pytest

from lm1b_hvd.data import dataset, vocab
from tests.helpers import run, write_lm1b_dir

VOCAB = ["<S> 0", "<UNK> 0"] + [f"w{i} 1" for i in range(50)]


def random_sentences(rng, count, max_len=30):
    return [" ".join(f"w{rng.integers(0, 60)}" for _ in range(rng.integers(1, max_len)))
            for _ in range(count)]


def streams_from_batches(batches):
    """Per row: the x, y and w sequences concatenated over batches."""
    xs = np.concatenate([b[0] for b in batches], axis=1)
    ys = np.concatenate([b[1] for b in batches], axis=1)
    ws = np.concatenate([b[2] for b in batches], axis=1)
    return xs, ys, ws


@pytest.mark.parametrize("batch_size, num_steps", [(1, 5), (3, 7), (8, 20), (5, 1)])
def test_packer_invariants(batch_size, num_steps):
    rng = np.random.default_rng(batch_size * 100 + num_steps)
    sentences = [np.array([0, *rng.integers(2, 40, size=rng.integers(1, 25)), 0], np.int32)
                 for _ in range(60)]
    batches = list(dataset.pack_batches(iter(sentences), batch_size, num_steps))
    assert all(b[0].shape == (batch_size, num_steps) for b in batches)
    xs, ys, ws = streams_from_batches(batches)
    # Every prediction of every sentence appears exactly once with w = 1.
    assert ws.sum() == sum(len(s) - 1 for s in sentences)
    assert set(np.unique(ws)) <= {0.0, 1.0}
    # Rows are streams: reading each row's weighted part gives whole sentences back to back,
    # y is x shifted by one along the stream (across batch boundaries too).
    recovered = []
    for row in range(batch_size):
        valid = ws[row] == 1
        assert not np.any(valid[np.argmin(valid):]) or valid.all(), "padding only at the end"
        x_row, y_row = xs[row, valid], ys[row, valid]
        assert np.array_equal(x_row[1:], y_row[:-1])
        stream = np.concatenate([x_row, y_row[-1:]]) if len(x_row) else x_row
        starts = np.flatnonzero(stream == 0)
        for begin, end in zip(starts[:-1], starts[1:]):
            if end - begin > 1:
                recovered.append(tuple(stream[begin:end + 1]))
    assert collections.Counter(recovered) == collections.Counter(tuple(s) for s in sentences)
    assert not np.any(xs[ws == 0]) and not np.any(ys[ws == 0])


def test_state_carrying_layout_row_continues_across_batches():
    sentence = np.array([0, 5, 6, 7, 8, 9, 0], np.int32)
    batches = list(dataset.pack_batches(iter([sentence]), batch_size=1, num_steps=4))
    assert [b[0].tolist() for b in batches] == [[[0, 5, 6, 7]], [[8, 9, 0, 0]]]
    assert [b[1].tolist() for b in batches] == [[[5, 6, 7, 8]], [[9, 0, 0, 0]]]
    assert [b[2].tolist() for b in batches] == [[[1, 1, 1, 1]], [[1, 1, 0, 0]]]


def all_sentences(parts, v):
    return [tuple(s) for part in parts for s in dataset.read_sentences(part, v)]


@pytest.mark.parametrize("num_files", [1, 2, 3, 5])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_sharding_is_disjoint_and_complete(tmp_path, num_files, num_ranks):
    rng = np.random.default_rng(num_files)
    shards = [
        "\n".join(f"w{f} w{i % 50}" + f" w{rng.integers(0, 50)}" * (i % 3) for i in range(37 + f)) + "\n"
        for f in range(num_files)]
    root = write_lm1b_dir(tmp_path / "d", shards, ["w1 w2\n"], VOCAB)
    v = vocab.load(str(root / dataset.VOCAB_FILE))
    paths = dataset.find_files(str(root), "train")
    whole = all_sentences(dataset.parts_for_rank(paths, 0, 1), v)
    per_rank = [all_sentences(dataset.parts_for_rank(paths, r, num_ranks), v) for r in range(num_ranks)]
    assert sorted(sum(per_rank, [])) == sorted(whole)
    lines_of = {p: len(open(p, "rb").read().splitlines()) for p in paths}
    located = [{(p.path, line) for p in dataset.parts_for_rank(paths, r, num_ranks)
                for line in range(p.offset, lines_of[p.path], p.stride)} for r in range(num_ranks)]
    for a in range(num_ranks):
        for b in range(a + 1, num_ranks):
            assert not located[a] & located[b]
    assert sum(len(lines) for lines in located) == sum(lines_of.values())
    assert all(per_rank), "every rank gets data"


def test_invalid_utf8_blank_lines_and_empty_files(tmp_path):
    shards = [b"w1 w2\n\n   \nw3 \xff\xfe w4\r\n", b"", b"\t\n"]
    root = write_lm1b_dir(tmp_path / "d", shards, ["w1\n"], VOCAB)
    v = vocab.load(str(root / dataset.VOCAB_FILE))
    ds = dataset.ShardedDataset.for_rank(str(root), "train", v)
    got = [s.tolist() for s in ds.sentences_once()]
    w = v.word_to_id
    assert got == [[0, w("w1"), w("w2"), 0], [0, w("w3"), v.unk_id, w("w4"), 0]]


def test_rank_without_sentences_is_an_error(tmp_path):
    root = write_lm1b_dir(tmp_path / "d", [b"", b"\n\n"], ["w1\n"], VOCAB)
    v = vocab.load(str(root / dataset.VOCAB_FILE))
    ds = dataset.ShardedDataset.for_rank(str(root), "train", v)
    with pytest.raises(dataset.DataError, match="no sentences in .*news.en-00001-of-00100"):
        list(dataset.pack_batches(ds.sentences_once(), 2, 3))
    with pytest.raises(dataset.DataError, match="no sentences in"):
        next(ds.iterate_forever(2, 3, seed=[0]))


def test_missing_files_name_the_directory(tmp_path):
    with pytest.raises(dataset.DataError, match=f"{tmp_path}: no train files matching"):
        dataset.find_files(str(tmp_path), "train")


def test_endless_iterator_is_seeded_and_reshuffles(tmp_path):
    rng = np.random.default_rng(0)
    root = write_lm1b_dir(tmp_path / "d", ["\n".join(random_sentences(rng, 40)) for _ in range(3)],
                          ["w1\n"], VOCAB)
    v = vocab.load(str(root / dataset.VOCAB_FILE))
    ds = dataset.ShardedDataset.for_rank(str(root), "train", v)

    def first(seed, count=200):
        it = ds.sentences_forever([seed])
        return [tuple(next(it)) for _ in range(count)]

    assert first(5) == first(5)
    assert first(5) != first(6)
    epoch1, epoch2 = first(5, 240)[:120], first(5, 240)[120:]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2
    assert sorted(epoch1) == sorted(tuple(s) for s in ds.sentences_once())


def test_a_stream_continued_from_its_saved_position_is_the_same_stream(tmp_path):
    rng = np.random.default_rng(1)
    root = write_lm1b_dir(tmp_path / "d", ["\n".join(random_sentences(rng, 30)) for _ in range(3)],
                          ["w1\n"], VOCAB)
    ds = dataset.ShardedDataset.for_rank(str(root), "train", vocab.load(str(root / dataset.VOCAB_FILE)))
    batches = ds.iterate_forever(4, 5, seed=[3, 0])
    straight = [next(batches) for _ in range(250)]  # ~3.5 epochs
    for stop in (1, 70, 150):
        saved = dataset.StreamPosition.from_dict(json.loads(json.dumps(straight[stop][3].to_dict())))
        resumed = ds.iterate_forever(4, 5, seed=[3, 0], position=saved)
        for expected in straight[stop + 1:]:
            got = next(resumed)
            for a, b in zip(got[:3], expected[:3]):
                np.testing.assert_array_equal(a, b)
            assert got[3] == expected[3]
    assert straight[-1][3].epoch >= 2


def test_reads_the_real_lm1b_sample(lm1b_sample):
    v = vocab.load(str(lm1b_sample / dataset.VOCAB_FILE))
    assert 13_000 < len(v) < 14_000
    heldout = dataset.ShardedDataset.for_rank(str(lm1b_sample), "heldout", v)
    sentences = list(heldout.sentences_once())
    assert len(sentences) == 1216
    batches = list(dataset.pack_batches(heldout.sentences_once(), 16, 20))
    predictions = sum(int(b[2].sum()) for b in batches)
    assert predictions == sum(len(s) - 1 for s in sentences)
    unk_rate = sum(int(np.sum(s == v.unk_id)) for s in sentences) / predictions
    assert 0.005 < unk_rate < 0.2
    train = [dataset.ShardedDataset.for_rank(str(lm1b_sample), "train", v, r, 3) for r in range(3)]
    assert sum(len(list(t.sentences_once())) for t in train) == 11_000


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(dataset.prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise dataset.DataError("no sentences in shard-7")

    got = dataset.prefetch(failing())
    assert next(got) == 1
    with pytest.raises(dataset.DataError, match="no sentences in shard-7"):
        next(got)


def test_training_on_a_rank_without_sentences_is_a_one_line_error(tmp_path):
    root = write_lm1b_dir(tmp_path / "d", [b"\n\n"], ["w1 w2\n"], VOCAB)
    result = run([sys.executable, "-m", "lm1b_hvd.train", "--datadir", str(root), "--logdir",
                  str(tmp_path / "log"), "--preset", "demo", "--max_steps", "2"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no sentences in {root}/training-monolingual.tokenized.shuffled/news.en-00001-of-00100")
