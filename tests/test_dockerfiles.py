"""The GPU Dockerfiles read as a user's build would take them (NGC's registry is not reachable
here, so docker/Dockerfile is checked by reading it; tests/test_container.py builds the others)."""
import re
import shlex

import pytest

from tests.helpers import REPO_ROOT

STACK = ("tensorflow", "horovod", "mpi4py", "numpy", "tensorboard", "openmpi", "nccl", "cuda")


def instructions(name):
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "docker" / name).read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current)
        current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical]


def pins(stack="2.15"):
    """The pins of a stack of stacks/: 2.15 is the images' (Debian bookworm's Python 3.11 and
    NVIDIA's TensorFlow 2.15 container)."""
    lines = (REPO_ROOT / "stacks" / stack / "requirements.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line)


def test_ngc_dockerfile_pins_its_base_and_adds_only_the_package_and_sacremoses():
    steps = instructions("Dockerfile")
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorflow:\d\d\.\d\d-tf2-py3", base), base
    runs = [args for keyword, args in steps if keyword == "RUN"]
    for command in runs:
        assert "apt-get" not in command and "conda" not in command, command
        for pip_install in re.findall(r"pip install ([^&;]*)", command):
            words = shlex.split(pip_install)
            assert "--no-deps" in words, f"pip may pull the stack over the base's: {command}"
            packages = [w for w in words if not w.startswith("-")]
            assert packages == ["."] or (packages[0] == f"sacremoses=={pins()['sacremoses']}"
                                         and set(packages[1:]) <= {"regex", "joblib", "click", "tqdm"}), command
    # The build refuses a base that drifted from the stack's pins.
    check = next(command for command in runs if "python -c" in command)
    tf_minor = ".".join(pins()["tensorflow-cpu"].split(".")[:2])
    assert f"tf.__version__.startswith('{tf_minor}')" in check
    assert f"horovod.__version__ == '{pins()['horovod']}'" in check
    assert "hvd.nccl_built()" in check and "is_built_with_cuda()" in check


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu-pip", "Dockerfile.cpu"])
def test_every_image_runs_the_package_the_readme_runs(name):
    steps = dict(instructions(name))
    assert "lm1b_hvd ./lm1b_hvd" in [args for keyword, args in instructions(name) if keyword == "COPY"]
    assert steps["CMD"].endswith('"python", "-m", "lm1b_hvd.train"]'), steps["CMD"]
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"docker/{name}" in readme


def test_pip_gpu_dockerfile_is_the_gpu_install_on_debian_as_non_root():
    steps = instructions("Dockerfile.gpu-pip")
    assert ("ARG", "BASE_IMAGE=debian:bookworm") in steps and ("FROM", "${BASE_IMAGE}") in steps
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert any(command.startswith("bash install.sh --gpu --stack-only") for command in runs)
    user = [args for keyword, args in steps if keyword == "USER"]
    assert user and user[-1] not in ("root", "0")
