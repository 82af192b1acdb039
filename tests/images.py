"""Building the project's images with podman, for tests/test_container.py: a bookworm base made
with debootstrap (no registry is reachable here) with the host's CA certificates, so that pip
inside the build reaches the package index; both images built side by side, in the background
while the rest of the suite runs (tests/conftest.py starts them)."""
import os
import resource
import shutil
import subprocess
import threading
import time

import pytest

from tests.helpers import REPO_ROOT

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
