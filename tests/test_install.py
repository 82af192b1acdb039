"""install.sh's refusals: a Python no stack runs on, a stack this Python cannot run, an environment
of another Python, and a Horovod patch that does not apply; each one line, a non-zero exit, and
nothing installed or changed. (Installing itself is what .ci/run does first, on both stacks.)"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCHES = "stacks/horovod-0.28.1"


def fake_python(folder, version):
    """A command that answers install.sh's question as a Python of `version` would."""
    path = folder / f"python{version}"
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def install(tmp_path, *args, python=None, venv=None, repo=REPO_ROOT):
    env = dict(os.environ, INSTALL_LOG=str(tmp_path / "install.log"), VENV=str(venv or tmp_path / "venv"))
    if python:
        env["PYTHON"] = str(python)
    return subprocess.run(["bash", str(repo / "install.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def refused_in_one_line(result, *phrases):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_python_no_stack_runs_on_is_refused_naming_the_pythons_that_work(tmp_path):
    result = install(tmp_path, python=fake_python(tmp_path, "3.14"))
    refused_in_one_line(result, "Python 3.14", "has no stack", "3.9-3.11", "3.9-3.13", "PYTHON=python3.12")
    assert not (tmp_path / "venv").exists() and not (tmp_path / "install.log").exists()


@pytest.mark.parametrize("stack, python, phrases", [
    ("2.15", "3.12", ("--stack 2.15 needs Python 3.9-3.11", "is Python 3.12", "PYTHON=")),
    ("2.17", "3.12", ("--stack 2.17: no such stack", "2.15", "2.20")),
])
def test_a_stack_this_python_cannot_run_is_refused(tmp_path, stack, python, phrases):
    result = install(tmp_path, "--stack", stack, python=fake_python(tmp_path, python))
    refused_in_one_line(result, *phrases)
    assert not (tmp_path / "venv").exists()


def test_a_python_that_is_not_there_is_refused(tmp_path):
    refused_in_one_line(install(tmp_path, python=tmp_path / "python3.12"), "no such command", "PYTHON=")


def test_an_environment_of_another_python_is_refused_not_mixed(tmp_path):
    other = "3.13" if sys.version_info[:2] != (3, 13) else "3.12"
    result = install(tmp_path, python=fake_python(tmp_path, other), venv=sys.prefix)
    refused_in_one_line(result, f"was made with Python {sys.version_info[0]}.{sys.version_info[1]}",
                        f"not {other}", "VENV=")


def test_a_horovod_patch_that_does_not_apply_names_its_hunk_and_leaves_the_environment_as_it_was(tmp_path):
    venv = pathlib.Path(sys.prefix)
    record = venv / "horovod-build.txt"
    if not record.is_file():
        pytest.skip("this environment was not made by install.sh (it has no record of its Horovod build)")
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "install.sh", repo)
    shutil.copytree(REPO_ROOT / "stacks", repo / "stacks")
    broken = repo / PATCHES / "0002-tensorflow-2.19-xla-builder-and-statusor.patch"
    text = broken.read_text()
    context = ' #include "tensorflow/compiler/tf2xla/xla_op_registry.h"\n'
    assert context in text
    broken.write_text(text.replace(context, ' #include "tensorflow/compiler/tf2xla/moved_away.h"\n', 1))
    import horovod
    library = next(pathlib.Path(horovod.__file__).parent.glob("tensorflow/mpi_lib*.so"))
    before = (record.read_text(), library.stat().st_mtime_ns, sorted(os.listdir(venv)))

    result = install(tmp_path, python=sys.executable, venv=venv, repo=repo)

    line = refused_in_one_line(result, f"Horovod patch {PATCHES}/0002-tensorflow-2.19-xla-builder-and-statusor.patch",
                               "does not apply to horovod-0.28.1",
                               "hunk #1 of horovod/tensorflow/xla_mpi_ops.cc failed at line 24",
                               f"nothing in {venv} changed")
    assert result.returncode == 1, line
    assert (record.read_text(), library.stat().st_mtime_ns, sorted(os.listdir(venv))) == before
    assert not (venv / "horovod-source" / "horovod-0.28.1").exists()


def test_help_says_the_stacks_and_an_example(tmp_path):
    result = install(tmp_path, "--help")
    assert result.returncode == 0 and "--stack 2.20" in result.stdout and "PYTHON=python3.12" in result.stdout
    assert not (tmp_path / "venv").exists()
