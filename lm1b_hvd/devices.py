"""Which device a rank trains on, and the check that a job given GPUs really gets them.

A GPU job whose TensorFlow finds no GPU still runs, on the CPU, about 100 times slower, and
its user finds out hours later from words/s. So when the scheduler or CUDA_VISIBLE_DEVICES
says that GPUs were given and TensorFlow sees none, the job stops at start, naming the cause
and the fix, unless --allow_cpu says that the CPU is meant.
"""
import os
import socket

import tensorflow as tf

from lm1b_hvd import console

GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")


class DeviceError(console.UserError):
    """GPUs were given to the job but TensorFlow cannot use them."""


def _names_gpus(name, value):
    if name == "SLURM_GPUS_ON_NODE":
        return value.isdigit() and int(value) > 0
    first = value.split(",")[0].strip()
    if name == "CUDA_VISIBLE_DEVICES":  # "-1", "" or Slurm's "NoDevFiles" hide every GPU
        return first.isdigit() or first.startswith(("GPU-", "MIG-"))
    return bool(first)


def gpus_given(environ=None):
    """'NAME=value' of the first variable saying this process was given GPUs, or None."""
    environ = os.environ if environ is None else environ
    for name in GPU_VARIABLES:
        value = environ.get(name, "").strip()
        if value and _names_gpus(name, value):
            return f"{name}={value}"
    return None


def check_gpus_used(allow_cpu, environ=None):
    """Raises DeviceError when GPUs were given but TensorFlow sees none (unless allow_cpu)."""
    given = gpus_given(environ)
    if not given or allow_cpu or tf.config.list_physical_devices("GPU"):
        return
    if not tf.test.is_built_with_cuda():
        cause = "this TensorFlow is the CPU-only build (tensorflow-cpu)"
        fix = "install the GPU stack with 'bash install.sh --gpu' or use a GPU image (docker/)"
    else:
        cause = "TensorFlow, a CUDA build, found no GPU (the NVIDIA driver did not load)"
        fix = "check 'nvidia-smi' on this node and that libcuda.so.1 is on the library path"
    raise DeviceError(f"{given} says this job has GPUs, but {cause}: {fix}; "
                      f"or pass --allow_cpu to train on the CPU anyway")


def describe(threads):
    """This process's training device in a few words, e.g. 'node7 GPU:3 (NVIDIA H100, cc 9.0)'."""
    host = socket.gethostname().split(".")[0]
    gpus = tf.config.get_visible_devices("GPU")
    if not gpus:
        return f"{host} CPU ({threads} threads)"
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability")
    name = details.get("device_name", "unknown GPU")
    if capability:
        name += f", cc {capability[0]}.{capability[1]}"
    return f"{host} {gpus[0].name.replace('/physical_device:', '')} ({name})"


# oneDNN's avx512_core, the least AVX-512 its matmuls use, and the ISA caps below it.
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
CAPS_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def onednn_avx512(cpuinfo="/proc/cpuinfo", environ=None):
    """Whether oneDNN's fp32 matmuls run AVX-512 kernels here: the CPU has AVX-512 and
    ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) does not cap them at AVX2 or below.
    Where the CPU's flags cannot be read, assumes it has."""
    environ = os.environ if environ is None else environ
    cap = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if cap in CAPS_BELOW_AVX512:
        return False
    try:
        with open(cpuinfo) as lines:
            flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or all(flag in flags for flag in AVX512_FLAGS)


def on_gpu():
    return bool(tf.config.get_visible_devices("GPU"))
