"""A job given GPUs that TensorFlow cannot see stops at start instead of training on the CPU."""
import sys

import pytest
import tensorflow as tf

from lm1b_hvd import devices
from tests.helpers import run


SEES_A_GPU = bool(tf.config.list_physical_devices("GPU"))
# What the error names as the cause, on this machine's TensorFlow.
CAUSE = ("TensorFlow, a CUDA build, found no GPU (the NVIDIA driver did not load)" if tf.test.is_built_with_cuda()
         else "this TensorFlow is the CPU-only build (tensorflow-cpu)")
needs_no_gpu = pytest.mark.skipif(SEES_A_GPU, reason="TensorFlow sees a GPU here: nothing to refuse")


@pytest.mark.parametrize("environ, given", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8d2f6c1e-0000"}, "CUDA_VISIBLE_DEVICES=GPU-8d2f6c1e-0000"),
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "SLURM_GPUS_ON_NODE=4"),
])
def test_which_variables_say_the_job_was_given_gpus(environ, given):
    assert devices.gpus_given(environ) == given


@needs_no_gpu
def test_gpus_given_but_unseen_names_cause_and_fix():
    with pytest.raises(devices.DeviceError) as raised:
        devices.check_gpus_used(allow_cpu=False, environ={"SLURM_JOB_GPUS": "0"})
    message = str(raised.value)
    assert message.startswith(f"SLURM_JOB_GPUS=0 says this job has GPUs, but {CAUSE}")
    assert ("bash install.sh --gpu" in message or "nvidia-smi" in message) and "--allow_cpu" in message
    devices.check_gpus_used(allow_cpu=True, environ={"SLURM_JOB_GPUS": "0"})
    devices.check_gpus_used(allow_cpu=False, environ={})


@pytest.mark.parametrize("command", [
    ["lm1b_hvd.train", "--logdir", "{logdir}"],
    ["lm1b_hvd.evaluate", "--logdir", "{logdir}", "--once"],
    ["lm1b_hvd.bench", "--preset", "demo"],
])
@needs_no_gpu
def test_every_command_refuses_before_writing_anything(tmp_path, command):
    logdir = tmp_path / "log"
    args = [arg.format(logdir=logdir) for arg in command]
    result = run([sys.executable, "-m", *args], env_extra={"CUDA_VISIBLE_DEVICES": "0"}, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: CUDA_VISIBLE_DEVICES=0 says this job has GPUs, but {CAUSE}"), last
    assert not logdir.exists()


AVX2_FLAGS = "fpu sse4_2 avx avx2 fma"
AVX512_FLAGS = AVX2_FLAGS + " avx512f avx512dq avx512bw avx512vl avx512_bf16"


@pytest.mark.parametrize("flags, environ, expected", [
    (AVX512_FLAGS, {}, True),
    (AVX2_FLAGS, {}, False),
    (AVX2_FLAGS + " avx512f", {}, False),  # not all that oneDNN's avx512_core needs
    (AVX512_FLAGS, {"ONEDNN_MAX_CPU_ISA": "avx2"}, False),
    (AVX512_FLAGS, {"DNNL_MAX_CPU_ISA": "AVX2_VNNI"}, False),
    (AVX512_FLAGS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
    (AVX512_FLAGS, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
])
def test_onednn_avx512_reads_the_cpu_flags_and_the_isa_cap(tmp_path, flags, environ, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nflags\t\t: {flags}\n")
    assert devices.onednn_avx512(str(cpuinfo), environ) is expected
    # Unreadable flags count as AVX-512; only a cap below it says otherwise.
    assert devices.onednn_avx512(str(tmp_path / "absent"), environ) is (not environ or expected)
