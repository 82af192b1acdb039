"""The package's seams: a trained model loads without the distributed stack, the update or the
exchange, and preparing data without TensorFlow; Horovod is imported by one module; the pinned
stack's private parts are touched by one module; how the ranks keep together is the sync mode's
alone; no library function takes more than seven parameters."""
import ast
import pathlib
import re
import subprocess
import sys

import pytest

from lm1b_hvd import pinned_stack
from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "lm1b_hvd"
# Public names with a leading underscore: a NamedTuple's API (so that its fields never clash),
# and os._exit (the exit that skips clean-up, for a thread that must end the process).
DOCUMENTED = {"_replace", "_fields", "_asdict", "_make", "_exit"}


def sources():
    return {path.relative_to(REPO_ROOT).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("command", ["inference", "score", "sample", "export"])
def test_using_a_model_loads_neither_horovod_nor_the_update_nor_the_exchange(command):
    probe = (f"import lm1b_hvd.{command}, sys; "
             "loaded = [m for m in sys.modules if m.startswith(('horovod', 'lm1b_hvd.update', 'lm1b_hvd.exchange', "
             "'lm1b_hvd.run.loop', 'lm1b_hvd.run.state'))]; assert not loaded, loaded")
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
    for name, text in sources().items():
        if name == "lm1b_hvd/pinned_stack.py":
            continue
        code = re.sub(r"#.*", "", text)
        for private in pinned_stack.PRIVATE_NAMES:
            assert not re.search(rf"(?<!\w){re.escape(private)}(?!\w)", code), f"{name} touches {private}"
        # A private attribute of anything but the object itself is someone else's, whatever names
        # the project defines; of the object itself, one this module defines (not a base class's).
        tree = ast.parse(text)
        own = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        own |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and re.fullmatch(r"_[a-z]\w*", node.attr)):
                continue
            if node.attr in DOCUMENTED:
                continue
            receiver = node.value.id if isinstance(node.value, ast.Name) else ast.unparse(node.value)
            assert receiver in ("self", "cls"), f"{name}: {receiver}.{node.attr} is a private attribute of another object"
            assert node.attr in own, f"{name}: self.{node.attr} is a private attribute of a class defined elsewhere"
    assert "_update_step" in (PACKAGE / "pinned_stack.py").read_text()


def test_the_loop_the_bench_and_the_checkpoints_ask_the_sync_mode():
    """Whether a run is two-level, and what it does then, is run/modes.py's: the loop, the bench
    and the checkpoints name none of its hparams or tests in their code."""
    for name in ("lm1b_hvd/run/loop.py", "lm1b_hvd/bench.py", "lm1b_hvd/run/checkpoints.py"):
        tree = ast.parse((REPO_ROOT / name).read_text())
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {node.arg for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg}
        mode_names = {"outer_every", "outer_momentum", "outer_lr", "outer_fp16", "two_level", "outer", "nodes"}
        assert not names & mode_names, f"{name} names {sorted(names & mode_names)}"


def test_no_library_function_takes_more_than_seven_parameters():
    """Values that travel together get a name (a record), not a place in a long argument list."""
    for name, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                count = len([argument for argument in arguments if argument.arg not in ("self", "cls")])
                assert count <= 7, f"{name}: {node.name} takes {count} parameters"


def test_every_private_name_has_its_version_said():
    text = (PACKAGE / "pinned_stack.py").read_text()
    for private in pinned_stack.PRIVATE_NAMES:
        assert private in text.split("PRIVATE_NAMES", 2)[-1], private
    for stack in ("Keras 2.15", "TensorFlow 2.15", "tf-keras 2.20", "TensorFlow 2.20", "Horovod 0.28.1"):
        assert stack in text, stack


def test_the_commands_sit_above_the_machinery():
    """Every command a user types is lm1b_hvd/<command>.py; the machinery is in the packages."""
    top = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    commands = {"train", "evaluate", "bench", "score", "sample", "export", "prepare_data", "benchmark_data", "status"}
    shared = {"console", "hparams", "devices", "inference", "pinned_stack", "ranks"}
    assert set(top) == commands | shared, sorted(set(top) ^ (commands | shared))
    for command in commands:
        assert re.search(r"^def main\(", (PACKAGE / f"{command}.py").read_text(), re.MULTILINE), command
    packages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert packages == ["data", "exchange", "model", "run", "update"]
    # Library code takes arguments: only the commands make parsers.
    for name, text in sources().items():
        if pathlib.PurePath(name).stem not in commands and name != "lm1b_hvd/console.py":
            assert "ArgumentParser(" not in text and "sys.argv" not in text, name
