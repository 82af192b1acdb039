"""scripts/local_cluster.sh: a cluster of network namespaces on this machine, each with its own
sshd, where `horovodrun -H` launches ranks over rate-limited links as on real nodes. Skipped
where namespaces cannot be made, unless LM1B_REQUIRE_CLUSTER=1 (CI) makes that a failure."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import DROPOUT, HOROVODRUN, REPO_ROOT, run, train_flags

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

SCRIPT = REPO_ROOT / "scripts" / "local_cluster.sh"


def cannot_make_a_cluster():
    """Why this machine cannot run the script (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"'{tool}' is not installed"
    if not os.path.exists("/usr/sbin/sshd"):
        return "openssh-server is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"lmcprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"lmcprobe{os.getpid()}"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def cluster_machine():
    reason = cannot_make_a_cluster()
    if reason:
        if os.environ.get("LM1B_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"LM1B_REQUIRE_CLUSTER=1 but {reason}")
        pytest.skip(reason)


def namespaces_of(pid):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"lmc{pid}")]


@pytest.mark.parametrize("mode", ["replicated", "vocab_parallel"])
def test_two_hosts_train_over_the_network_in_either_mode(cluster_machine, tiny_corpus, tmp_path, mode):
    logdir = tmp_path / "log"
    hpconfig = DROPOUT + (",vocab_parallel=true" if mode == "vocab_parallel" else "")
    train = (f"{HOROVODRUN} -np 2 -H $CLUSTER_HOSTS --network-interface eth0 --gloo {sys.executable} "
             f"-m lm1b_hvd.train {shlex.join(train_flags(tiny_corpus, logdir, max_steps=5, hpconfig=hpconfig))}")
    result = run(["bash", str(SCRIPT), "2", "200", train], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "local_cluster: 2 host(s) 10.251.0.1:1,10.251.0.2:1, each link 200 Mbit/s each way" in result.stdout
    assert "lm1b_hvd: 2 rank(s)" in result.stdout
    assert "stopped at step 5 (max_steps)" in result.stdout
    assert (logdir / "ckpt-5.index").exists()
    assert "local_cluster: done (exit 0); the cluster is torn down" in result.stdout
    assert not [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("lmc")]


def test_the_links_are_rate_limited_and_a_failing_command_gives_its_status(cluster_machine):
    """10 MB over a 40 Mbit/s link take at least 2 s (10 MB x 8 / 40 Mbit/s)."""
    copy = "TIMEFORMAT='seconds %R'; time (head -c 10000000 /dev/zero | ssh 10.251.0.2 'cat > /dev/null'); exit 7"
    result = run(["bash", str(SCRIPT), "2", "40", copy], timeout=120)
    assert result.returncode == 7, result.stderr[-2000:]
    seconds = float(next(line for line in result.stderr.splitlines() if line.startswith("seconds")).split()[1])
    assert 2.0 <= seconds < 20.0, seconds


def test_an_interrupted_cluster_is_torn_down(cluster_machine):
    # SIGINT as a terminal's Ctrl-C gives it, whatever this test inherited: a suite started in
    # the background (`cmd &`) ignores SIGINT, and a shell cannot trap a signal ignored at entry.
    script = subprocess.Popen(["bash", str(SCRIPT), "2", "100", "sleep 120"], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(namespaces_of(script.pid)) < 3:  # the switch and two hosts
        assert script.poll() is None and time.monotonic() < deadline, script.stderr.read() if script.poll() else ""
        time.sleep(0.2)
    while not any("sshd-2.conf" in line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                                     text=True).stdout.splitlines()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    script.send_signal(signal.SIGINT)
    assert script.wait(timeout=30) == 130
    assert namespaces_of(script.pid) == []


def test_bad_arguments_are_one_line():
    result = run(["bash", str(SCRIPT), "two", "100", "true"])
    assert result.returncode == 2
    assert result.stderr.strip() == "local_cluster.sh: K must be a number of hosts from 1 to 16, got 'two'"
    assert run(["bash", str(SCRIPT), "--help"]).stdout.startswith("A cluster of K \"hosts\" on this machine")
