"""docker/Dockerfile.cpu and docker/Dockerfile.gpu-pip really built with podman and run.

No registry is reachable here, so the bookworm base is made with debootstrap
and imported; the host's CA certificates go into it so that pip inside the
build reaches the package index. .ci/run sets LM1B_REQUIRE_PODMAN=1, so there
a podman that cannot run fails instead of skipping.
"""
import os
import re
import resource
import shutil
import subprocess
import threading
import time
import uuid

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`

BASE_IMAGE = "localhost/lm1b-bookworm-base:latest"
IMAGE = "localhost/lm1b_hvd:cpu-test"
GPU_PIP_IMAGE = "localhost/lm1b_hvd:gpu-pip-test"
DEBIAN_MIRROR = os.environ.get("LM1B_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def podman(*args, timeout=600, check=True):
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def podman_problem():
    if not shutil.which("podman"):
        return "podman is not installed (install.sh --with-test-tools installs it)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1] if info.stderr.strip() else '?'}"
    return None


def capped_ulimits():
    """Container ulimits no higher than this host's hard limits (runc refuses more)."""
    flags = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(limit)[1]
        value = 32768 if hard == resource.RLIM_INFINITY else min(hard, 32768)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def ensure_base_image(workdir):
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is needed to make the bookworm base image (install.sh --with-test-tools)")
    rootfs = workdir / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
                   check=True, capture_output=True, timeout=900)
    extra = rootfs / "usr/local/share/ca-certificates"
    extra.mkdir(parents=True, exist_ok=True)
    for cert in os.listdir("/usr/local/share/ca-certificates"):
        shutil.copy(os.path.join("/usr/local/share/ca-certificates", cert), extra)
    (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()


def build_command(context, dockerfile="docker/Dockerfile.cpu", tag=IMAGE, build_args=()):
    flags = [item for arg in (f"BASE_IMAGE={BASE_IMAGE}", *build_args) for item in ("--build-arg", arg)]
    return ["podman", "build", "--runtime", "runc", "--network", "host", *capped_ulimits(), *flags, "-f", dockerfile,
            "-t", tag, str(context)]


def build(context, dockerfile="docker/Dockerfile.cpu", tag=IMAGE, build_args=()):
    return podman(*build_command(context, dockerfile, tag, build_args)[1:], timeout=1800)


def copy_tracked_files(destination):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)


# The GPU image's build starts once the CPU image's first dependency layer, which both share, is
# committed; from there the two build side by side (one downloads while the other compiles).
SHARED_LAYER_DONE = "RUN bash install.sh --stack-only"
BUILD_SECONDS = 2400


def build_images(workdir):
    """Builds both images from a copy of the tracked files: {"context": the build context, "cpu":
    the CPU image's build log, "gpu": the GPU image's}. Horovod's CUDA kernels for one compute
    capability in the GPU image: the build and what the test checks are the same for five, at a
    fraction of the compile time."""
    ensure_base_image(workdir)
    context = workdir / "context"
    copy_tracked_files(context)
    logs = {name: workdir / f"{name}-build.log" for name in ("cpu", "gpu")}
    commands = {"cpu": build_command(context),
                "gpu": build_command(context, "docker/Dockerfile.gpu-pip", GPU_PIP_IMAGE,
                                     build_args=["HOROVOD_BUILD_CUDA_CC_LIST=80"])}
    running = {}
    deadline = time.monotonic() + BUILD_SECONDS
    try:
        running["cpu"] = subprocess.Popen(commands["cpu"], stdout=open(logs["cpu"], "w"), stderr=subprocess.STDOUT)
        while SHARED_LAYER_DONE not in logs["cpu"].read_text() and running["cpu"].poll() is None:
            assert time.monotonic() < deadline, "the CPU image's first layer took too long"
            time.sleep(1)
        running["gpu"] = subprocess.Popen(commands["gpu"], stdout=open(logs["gpu"], "w"), stderr=subprocess.STDOUT)
        for name, process in running.items():
            process.wait(timeout=max(1, deadline - time.monotonic()))
            assert process.returncode == 0, f"{name} image build failed:\n{logs[name].read_text()[-4000:]}"
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
    return {"context": context, **{name: path.read_text() for name, path in logs.items()}}


class BackgroundBuild:
    """The image builds run in a thread while the rest of the suite runs (tests/conftest.py starts
    it when this module's tests are selected, and runs them last): they are mostly downloads and
    compiles, and much of the other tests' time is waiting for a timeout or a scheduler."""
    started = None

    def __init__(self, workdir):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(workdir,), daemon=True)
        self.thread.start()

    def _run(self, workdir):
        try:
            self.result = build_images(workdir)
        except BaseException as error:  # handed to the test that waits for the images
            self.error = error

    def wait(self):
        self.thread.join(BUILD_SECONDS)
        if self.error:
            raise self.error
        assert self.result, "the image builds did not finish"
        return self.result


def start_builds_in_background(workdir):
    if podman_problem() is None and BackgroundBuild.started is None:
        BackgroundBuild.started = BackgroundBuild(workdir)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    problem = podman_problem()
    if problem:
        if os.environ.get("LM1B_REQUIRE_PODMAN") == "1":
            pytest.fail(problem)
        print(f"SKIPPED container tests: {problem}")
        pytest.skip(problem)
    if BackgroundBuild.started:
        return BackgroundBuild.started.wait()
    return build_images(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(builds):
    return builds["context"]


@pytest.fixture(scope="module")
def gpu_pip_image(builds):
    return builds["gpu"]


def run_in_image(*command, image=IMAGE, env=(), check=True):
    flags = [item for name in env for item in ("--env", name)]
    return podman("run", "--rm", "--runtime", "runc", *capped_ulimits(), *flags, image, *command,
                  timeout=900, check=check)


def test_podman_built_cpu_image_runs_the_demo_as_non_root(image):
    assert run_in_image("id", "-u").stdout.strip() != "0"
    out = run_in_image("horovodrun", "-np", "2", "python", "-m", "lm1b_hvd.train", "--max_steps", "400",
                       "--log_every", "200").stdout
    assert "2 rank(s)" in out and "stopped at step" in out
    match = re.search(r"eval perplexity ([\d.]+) \| oracle perplexity ([\d.]+)", out)
    assert match, out[-3000:]
    model, oracle = (float(v) for v in match.groups())
    assert oracle < model < 3 * oracle


def test_source_change_keeps_the_dependency_layer_cached(image):
    # A marker no earlier build has seen: podman's layer cache outlives test runs on the same machine.
    (image / "lm1b_hvd" / "__init__.py").write_text(
        (image / "lm1b_hvd" / "__init__.py").read_text() + f"# touched by the cache test {uuid.uuid4()}\n")
    log = build(image).stdout
    install_step = log.split("RUN bash install.sh --stack-only", 1)[1].split("STEP", 1)[0]
    assert "Using cache" in install_step, log[-3000:]
    after_source = log.split("COPY lm1b_hvd", 1)[1]
    assert "Using cache" not in after_source.split("STEP", 1)[0]


def test_gpu_pip_image_builds_here_with_cuda_and_nccl_and_refuses_to_train_without_a_gpu(gpu_pip_image):
    shared_step = gpu_pip_image.split("RUN bash install.sh --system-only", 1)[1].split("STEP", 1)[0]
    assert "Using cache" in shared_step, "the CPU image's first dependency layer serves the GPU image too"
    assert "[X] NCCL" in run_in_image("horovodrun", "--check-build", image=GPU_PIP_IMAGE).stdout
    built = run_in_image("python", "-c", "import tensorflow as tf; print(tf.test.is_built_with_cuda())",
                         image=GPU_PIP_IMAGE).stdout
    assert built.strip().splitlines()[-1] == "True"
    train = ["python", "-m", "lm1b_hvd.train", "--logdir", "/tmp/run", "--max_steps", "4", "--log_every", "2"]
    refused = run_in_image(*train, image=GPU_PIP_IMAGE, env=["CUDA_VISIBLE_DEVICES=0"], check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: CUDA_VISIBLE_DEVICES=0 says this job has GPUs, but TensorFlow, a CUDA build, found no GPU")
    allowed = run_in_image("horovodrun", "-np", "2", *train, "--allow_cpu", image=GPU_PIP_IMAGE,
                           env=["CUDA_VISIBLE_DEVICES=0"]).stdout
    assert "device rank 1: " in allowed and "stopped at step 4 (max_steps)" in allowed
    # A GPU install builds no CPU kernels, and trains without them: the portable ops a GPU runs.
    assert "compute plan: kernels=portable (auto: the CPU kernels are not built)" in allowed
