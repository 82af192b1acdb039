"""Elastic training on this machine with real `horovodrun --min-np 1 --max-np 2`: one rank's
process is killed mid-run and the survivor finishes the run from the last commit.

Horovod blacklists the host of a failed worker, so the two ranks are put on two names of this
machine (localhost and 127.0.0.1) by the host-discovery script: losing one keeps the other."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import HOROVODRUN, TINY, ranks_of, start, train_flags

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`


@pytest.fixture
def discovery_script(tmp_path):
    script = tmp_path / "discover_hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    script.chmod(0o755)
    return script


@pytest.mark.every_stack
def test_a_killed_rank_leaves_the_survivor_to_finish_from_the_last_commit(tiny_corpus, tmp_path, discovery_script):
    logdir = tmp_path / "log"
    command = [HOROVODRUN, "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
               str(discovery_script), sys.executable, "-m", "lm1b_hvd.train",
               *train_flags(tiny_corpus, logdir, "--elastic", "--commit_steps", 10, "--log_every", 20, max_steps=600,
                            hpconfig=TINY)]
    job = start(command, stderr=subprocess.STDOUT)
    lines, deadline = [], time.monotonic() + 300
    while not any(re.search(r"step (1[0-9]{2}) \| loss", line) for line in lines):
        line = job.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines)[-3000:]
        lines.append(line)
    victim = ranks_of(logdir, environment=(b"HOROVOD_HOSTNAME",)).get("127.0.0.1")
    assert victim, "".join(lines)[-2000:]
    os.kill(victim, signal.SIGKILL)
    rest, _ = job.communicate(timeout=300)
    output = "".join(lines) + rest
    assert job.returncode == 0, output[-4000:]
    reset = re.search(r"elastic reset: 1 rank\(s\) from the commit at step (\d+); data re-sharded", output)
    assert reset, output[-4000:]
    assert int(reset.group(1)) % 10 == 0 and int(reset.group(1)) >= 100
    assert "stopped at step 600 (max_steps)" in output
    losses = [(int(s), float(v)) for s, v in re.findall(r"step (\d+) \| loss ([\d.]+)", output)]
    before = [loss for step, loss in losses if step <= int(reset.group(1))]
    after = [loss for step, loss in losses if step > int(reset.group(1)) + 100]
    assert after and after[-1] < before[-1] < before[0], losses
