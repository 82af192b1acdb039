import functools
import hashlib
import http.server
import io
import tarfile
import threading

import pytest

from lm1b_hvd import prepare_data
from lm1b_hvd.data import dataset, lm1b_download, vocab

ROOT = lm1b_download.ARCHIVE_ROOT
TRAIN = f"{ROOT}/training-monolingual.tokenized.shuffled"
HELDOUT = f"{ROOT}/heldout-monolingual.tokenized.shuffled"


def make_archive(path, files, links=()):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


GOOD = {
    f"{TRAIN}/news.en-00001-of-00100": "the cat sat\nthe dog sat\n\n",
    f"{TRAIN}/news.en-00002-of-00100": "the cat ran\na rare word\n",
    f"{HELDOUT}/news.en.heldout-00000-of-00050": "the cat sat on the mat\n",
}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_builds_the_original_vocabulary_format(tmp_path, server, capsys):
    www, url = server
    archive = make_archive(www / "lm1b.tar.gz", GOOD)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    code = prepare_data.main(["lm1b", "--outdir", str(out), "--url", f"{url}/lm1b.tar.gz",
                              "--sha256", sha, "--min_count", "2"])
    assert code == 0
    datadir = out / ROOT
    assert f"--datadir {datadir}" in capsys.readouterr().out
    v = vocab.load(str(datadir / dataset.VOCAB_FILE))
    assert [w.decode() for w in v.words] == ["<S>", "<UNK>", "the", "cat", "sat"]
    assert v.counts == [4, 5, 3, 2, 2]  # 4 sentences; dog, ran, a, rare, word seen once
    assert not (out / "lm1b.tar.gz").exists()
    assert len(dataset.find_files(str(datadir), "train")) == 2


def test_checksum_mismatch_is_refused(tmp_path, server):
    www, url = server
    make_archive(www / "lm1b.tar.gz", GOOD)
    with pytest.raises(lm1b_download.DownloadError, match="SHA-256 .* does not match 00ff"):
        lm1b_download.fetch_lm1b(str(tmp_path / "out"), f"{url}/lm1b.tar.gz", "00ff")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("bad_files, links, message", [
    ({"../evil.txt": "owned\n"}, (), "member '../evil.txt' points outside"),
    ({"/tmp/abs-evil.txt": "owned\n"}, (), "points outside"),
    ({}, [(f"{ROOT}/link", "/etc/passwd")], f"member '{ROOT}/link' is a link"),
])
def test_malicious_members_are_refused_before_anything_is_written(tmp_path, server, capsys,
                                                                  bad_files, links, message):
    www, url = server
    make_archive(www / "bad.tar.gz", {**GOOD, **bad_files}, links)
    out = tmp_path / "deep" / "out"
    code = prepare_data.main(["lm1b", "--outdir", str(out), "--url", f"{url}/bad.tar.gz"])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (out / ROOT).exists(), "nothing extracted from a refused archive"


def test_unreachable_url_is_a_clear_error(tmp_path, server):
    _, url = server
    with pytest.raises(lm1b_download.DownloadError, match="missing.tar.gz: download failed"):
        lm1b_download.fetch_lm1b(str(tmp_path / "out"), f"{url}/missing.tar.gz")
