"""docker/Dockerfile.cpu and docker/Dockerfile.gpu-pip really built with podman and run.

No registry is reachable here, so the bookworm base is made with debootstrap
and imported; the host's CA certificates go into it so that pip inside the
build reaches the package index. .ci/run sets LM1B_REQUIRE_PODMAN=1, so there
a podman that cannot run fails instead of skipping.
"""
import os
import re
import uuid

import pytest

from tests.images import (GPU_PIP_IMAGE, IMAGE, BackgroundBuild, build, build_images, capped_ulimits, podman,
                          podman_problem)

pytestmark = pytest.mark.slow  # trains or builds for minutes: not in `pytest -m "not slow"`


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
