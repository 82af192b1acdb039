"""What the tests share: the repository's places, running the commands as a user would (one
process, or ranks under horovodrun), the tiny model and corpora they train, and reading back
what a run left (checkpoints, event files, progress, its processes). Fixtures are in conftest.py."""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import tensorflow as tf

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LM1B_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "lm1b-sample"
HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or "horovodrun"

# The tiny model every trained test run uses, over the demo preset: seconds a run on 2 cores.
TINY = "batch_size=4,num_steps=5,emb_size=8,state_size=16,projected_size=8,num_sampled=16"
# With dropout: an exact resume must draw the masks an unbroken run draws.
DROPOUT = TINY + ",keep_prob=0.8"
# Big enough that a checkpoint takes a while to write (~4 MB), small enough to train fast.
SLOW_TO_SAVE = "batch_size=4,num_steps=5,emb_size=64,state_size=256,projected_size=64,num_sampled=16"
# mpirun as root over loopback only.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,tcp",
           "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}


# Running the commands.

def command_env(env_extra=None):
    """The environment the commands run in: the package importable, TensorFlow quiet."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}


def run(cmd, timeout=300, env_extra=None, stdin_text=None):
    """A command run to its end from the repository root."""
    return subprocess.run(cmd, cwd=REPO_ROOT, env=command_env(env_extra), capture_output=True, text=True,
                          timeout=timeout, input=stdin_text)


def start(cmd, env_extra=None, **popen):
    """A command started from the repository root, its output piped (unless `popen` says
    otherwise); the caller waits for it or kills it (kill_tree)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=command_env(env_extra), **popen)


def under_horovodrun(args, np_=2, controller="--gloo"):
    """`horovodrun -np N` around a Python command line (`args` after the interpreter)."""
    return [HOROVODRUN, "-np", str(np_), controller, sys.executable, *map(str, args)]


def horovodrun(args, np_=2, controller="--gloo", **kwargs):
    return run(under_horovodrun(args, np_, controller), **kwargs)


def train_flags(corpus, logdir, *extra, max_steps=None, hpconfig=TINY):
    """The train command's flags in a test: the demo preset with `hpconfig` on `corpus`, no
    progress lines and no checkpoint by the clock unless `extra` asks."""
    flags = ["--datadir", corpus, "--logdir", logdir, "--preset", "demo", "--hpconfig", hpconfig,
             "--log_every", 1000, "--checkpoint_secs", 100000,
             *(["--max_steps", max_steps] if max_steps is not None else []), *extra]
    return [str(flag) for flag in flags]


def train_command(corpus, logdir, *extra, ranks=1, controller="--gloo", **flags):
    """`python -m lm1b_hvd.train` with train_flags, under horovodrun for ranks > 1."""
    args = ["-m", "lm1b_hvd.train", *train_flags(corpus, logdir, *extra, **flags)]
    return under_horovodrun(args, ranks, controller) if ranks > 1 else [sys.executable, *args]


def train(corpus, logdir, *extra, timeout=600, **options):
    """A train command (train_command's options) run to a successful end; its stdout."""
    result = run(train_command(corpus, logdir, *extra, **options), timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def kill_tree(pid):
    """SIGKILL to a process and every descendant (horovodrun's ranks start their own sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    doomed, queue = [], [pid]
    while queue:
        current = queue.pop()
        doomed.append(current)
        queue.extend(children.get(current, []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ranks_of(logdir, environment=(b"HOROVOD_RANK", b"OMPI_COMM_WORLD_RANK", b"SLURM_PROCID")):
    """{rank: pid} of the training processes writing into `logdir`, by the variable of their
    environment that says their rank (HOROVOD_RANK under Gloo, OMPI_COMM_WORLD_RANK under MPI,
    SLURM_PROCID under srun; or another, e.g. HOROVOD_HOSTNAME, whose value is then the key)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"lm1b_hvd.train" not in command or str(logdir).encode() not in command:
            continue
        for variable in environ:
            name, _, value = variable.partition(b"=")
            if name in environment:
                found[int(value) if value.isdigit() else value.decode()] = int(entry)
    return found


# Corpora.

def write_lm1b_dir(root, train_shards, heldout_shards, vocab_lines):
    """Writes the lm1b layout: lists of file contents (str or bytes) and vocabulary lines."""
    root = pathlib.Path(root)
    train_dir = root / "training-monolingual.tokenized.shuffled"
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir(parents=True)
    heldout.mkdir(parents=True)
    for index, text in enumerate(train_shards, start=1):
        _write(train_dir / f"news.en-{index:05d}-of-00100", text)
    for index, text in enumerate(heldout_shards):
        _write(heldout / f"news.en.heldout-{index:05d}-of-00050", text)
    (root / "1b_word_vocab.txt").write_text("".join(line + "\n" for line in vocab_lines))
    return root


def write_tiny_demo_corpus(root):
    """A demo corpus small enough for seconds-long runs (40 words, 400 training sentences)."""
    from lm1b_hvd.data import demo_corpus
    spec = demo_corpus.LanguageSpec(num_words=40, num_classes=4, successors=2, start_classes=2)
    demo_corpus.write_corpus(str(root), spec, train_sentences=400, heldout_sentences=40, train_files=3)
    return root


def _write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


# What a run left.

def read_checkpoint(path):
    """{key: value} of every variable of the checkpoint `path` (no save counter, no object graph)."""
    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "save_counter" not in name and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def saved_variables(logdir, step):
    return read_checkpoint(pathlib.Path(logdir) / f"ckpt-{step}")


def assert_same_variables(expected, got, atol=1e-6):
    assert sorted(expected) == sorted(got)
    for name, value in expected.items():
        if isinstance(value, bytes):
            assert value == got[name], name
        else:
            np.testing.assert_allclose(got[name], value, rtol=0, atol=atol, err_msg=name)


def without_run_position(variables):
    """Saved variables but the run position (which names the ranks and nodes that saved it)."""
    return {name: value for name, value in variables.items() if not name.startswith("run_position/")}


def latest_step(logdir):
    """The step of the checkpoint the `checkpoint` file names, 0 without one."""
    path = tf.train.latest_checkpoint(str(logdir))
    return int(path.rsplit("-", 1)[1]) if path else 0


def logged_step(logdir):
    """The step of the latest progress line (L/progress.json), 0 before the first."""
    try:
        return json.loads((pathlib.Path(logdir) / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def snapshot(directory, but=()):
    """{relative path: sha256} of every file under `directory`, except the names in `but`."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return {}
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name not in but}


def scalars(event_dir):
    """{tag: {step: value}} from the TensorBoard event files in `event_dir`."""
    out = {}
    for name in os.listdir(event_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(event_dir, name)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, {})[event.step] = number
    return out
