import pytest

from lm1b_hvd.data import vocab


def test_ids_follow_file_order(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("<S> 10\nthe 7\n<UNK> 3\ncat 1\n")
    v = vocab.load(str(path))
    assert len(v) == 4
    assert (v.sentence_id, v.unk_id) == (0, 2)
    assert v.word_to_id("the") == 1 and v.word_to_id("cat") == 3
    assert v.word_to_id("dog") == 2
    assert v.id_to_word(3) == "cat"
    assert v.counts == [10, 7, 3, 1]


@pytest.mark.parametrize("text, message", [
    ("the 7\n<UNK> 3\n", "v.txt: vocabulary has no <S> entry"),
    ("<S> 7\nthe 3\n", "v.txt: vocabulary has no <UNK> entry"),
    ("<S> 7\n<UNK> 3\nthe cat 2\n", "v.txt:3: expected 'word count', got 'the cat 2'"),
    ("<S> 7\n<UNK> x\n", "v.txt:2: expected 'word count'"),
    ("<S> 7\n\n<UNK> 3\n", "v.txt:2: blank line"),
])
def test_malformed_vocabulary_is_named(tmp_path, text, message):
    path = tmp_path / "v.txt"
    path.write_text(text)
    with pytest.raises(vocab.VocabError) as err:
        vocab.load(str(path))
    assert message in str(err.value)


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(vocab.VocabError, match="nope.txt: vocabulary file not found"):
        vocab.load(str(tmp_path / "nope.txt"))


def test_write_then_load_round_trip(tmp_path):
    v = vocab.Vocabulary([b"<S>", b"<UNK>", "caf\u00e9".encode()], [5, 0, 2])
    v.write(str(tmp_path / "out.txt"))
    again = vocab.load(str(tmp_path / "out.txt"))
    assert again.words == v.words and again.counts == [5, 0, 2]
    assert again.word_to_id("caf\u00e9") == 2
