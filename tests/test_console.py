"""What the user reads: whole lines, one-line errors, progress with an ETA, atomic files."""
import io
import os

import pytest

from lm1b_hvd import console


class CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_a_line_goes_out_in_one_write():
    stream = CountingStream()
    console.say("step 10 | loss 4.2", stream)
    assert stream.getvalue() == "step 10 | loss 4.2\n" and stream.writes == 1


def test_a_user_error_is_one_line_and_exit_status_1(capsys):
    def body():
        raise console.UserError("data/vocab.txt:3: expected 'word count'")
    assert console.run_main(body) == 1
    assert capsys.readouterr().err == "error: data/vocab.txt:3: expected 'word count'\n"
    assert console.run_main(lambda: None) == 0


def test_a_bad_flag_is_one_line_naming_the_help(capsys):
    parser = console.ArgumentParser("demo")
    parser.add_argument("--max_steps", type=int)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--max_steps", "ten"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --max_steps: invalid int value: 'ten' (see ")


def test_meter_reports_fraction_rate_and_eta():
    lines = []
    meter = console.Meter("download lm1b.tar.gz", 1_000_000_000, "MB", scale=1e6, every=0.0, report=lines.append)
    meter.update(250_000_000)
    assert lines and lines[0].startswith("download lm1b.tar.gz: 250.0/1,000.0 MB (25%) | ")
    assert " MB/s | eta " in lines[0]
    quiet = console.Meter("count", 10, "files", every=3600.0, report=lines.append)
    quiet.update(5)
    assert len(lines) == 1, "nothing before `every` seconds have passed"


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "best.json"
    console.write_atomically(str(path), '{"step": 1}')
    assert path.read_text() == '{"step": 1}'

    class Unwritable:
        def __str__(self):
            raise RuntimeError("serialising failed half way")
    with pytest.raises(TypeError):
        console.write_atomically(str(path), Unwritable())
    assert path.read_text() == '{"step": 1}'
    assert os.listdir(tmp_path) == ["best.json"], "no temporary file left behind"
