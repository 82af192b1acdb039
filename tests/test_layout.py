"""The package's seams: a trained model loads without the distributed stack or the training step,
and preparing data without TensorFlow;
Horovod is imported by one module; the pinned stack's private parts are touched by one module."""
import pathlib
import re
import subprocess
import sys

from lm1b_hvd import pinned_stack
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "lm1b_hvd"
# Public names with a leading underscore: a NamedTuple's API (so that its fields never clash),
# and os._exit (the exit that skips clean-up, for a thread that must end the process).
DOCUMENTED = {"_replace", "_fields", "_asdict", "_make", "_exit"}


def sources():
    return {path.relative_to(REPO_ROOT).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_inference_loads_without_horovod_or_the_training_step():
    probe = ("import lm1b_hvd.inference, sys; "
             "assert not [m for m in sys.modules if m.startswith('horovod')], 'horovod'; "
             "loaded = [m for m in sys.modules if m in ('lm1b_hvd.update.step', 'lm1b_hvd.exchange.collectives', "
             "'lm1b_hvd.exchange.gradients', 'lm1b_hvd.run.loop')]; assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_preparing_data_loads_without_tensorflow():
    """prepare_data (a text corpus of gigabytes on a machine without a GPU stack) starts in a
    fraction of a second, and its tokenizing workers carry no TensorFlow."""
    probe = "import lm1b_hvd.prepare_data, sys; assert 'tensorflow' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_one_module_imports_horovod():
    importing = [name for name, text in sources().items()
                 if re.search(r"^\s*(import horovod|from horovod)", text, re.MULTILINE)]
    assert importing == ["lm1b_hvd/exchange/collectives.py"]


def test_the_pinned_stacks_private_parts_are_touched_in_pinned_stack_py_alone():
    texts = sources()
    own = set()  # underscore names the project defines itself (its own privates, its overrides)
    for text in texts.values():
        own.update(re.findall(r"\bdef (_\w+)", text))
        own.update(re.findall(r"\bclass (_\w+)", text))
        own.update(re.findall(r"\bself\.(_\w+)\s*=", text))
        own.update(re.findall(r"^(_\w+)\s*=", text, re.MULTILINE))
    own.update(re.findall(r'Extension\("[\w.]*\.(_\w+)"', (REPO_ROOT / "setup.py").read_text()))  # the kernels' library
    own -= set(pinned_stack.PRIVATE_NAMES)
    for name, text in texts.items():
        if name == "lm1b_hvd/pinned_stack.py":
            continue
        for private in pinned_stack.PRIVATE_NAMES:
            code = re.sub(r"#.*", "", text)
            assert not re.search(rf"(?<!\w){re.escape(private)}(?!\w)", code), f"{name} touches {private}"
        # Any other attribute of someone else's with a leading underscore.
        for receiver, attribute in re.findall(r"(\w+|\))\.(_[a-z]\w*)", text):
            if receiver in ("self", "cls") or attribute in own or attribute in DOCUMENTED:
                continue
            raise AssertionError(f"{name}: {receiver}.{attribute} is a private attribute of another package")
    assert "_update_step" in texts["lm1b_hvd/pinned_stack.py"]


def test_every_private_name_has_its_version_said():
    text = (PACKAGE / "pinned_stack.py").read_text()
    for private in pinned_stack.PRIVATE_NAMES:
        assert private in text.split("PRIVATE_NAMES", 2)[-1], private
    assert "Keras 2.15" in text and "TensorFlow 2.15" in text and "Horovod 0.28.1" in text


def test_the_commands_sit_above_the_machinery():
    """Every command a user types is lm1b_hvd/<command>.py; the machinery is in the packages."""
    top = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    commands = {"train", "evaluate", "bench", "score", "sample", "export", "prepare_data", "benchmark_data", "status"}
    shared = {"console", "hparams", "devices", "inference", "pinned_stack"}
    assert set(top) == commands | shared, sorted(set(top) ^ (commands | shared))
    for command in commands:
        assert re.search(r"^def main\(", (PACKAGE / f"{command}.py").read_text(), re.MULTILINE), command
    packages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert packages == ["data", "exchange", "model", "run", "update"]
    # Library code takes arguments: only the commands make parsers.
    for name, text in sources().items():
        if pathlib.PurePath(name).stem not in commands and name != "lm1b_hvd/console.py":
            assert "ArgumentParser(" not in text and "sys.argv" not in text, name
