"""Package metadata, and the build of the CPU kernels (CPU installs only); the pinned stack is
read from stacks/<stack>/requirements.txt, the stack being the installed TensorFlow's (2.15 or 2.20).
The kernels compile against the installed TensorFlow's headers and library, so TensorFlow comes
first and pip runs without build isolation (install.sh does both)."""
import os
import platform
from pathlib import Path

from setuptools import Extension, find_packages, setup


def installed_tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise SystemExit("lm1b_hvd: building its CPU kernels needs TensorFlow installed first, "
                         "and pip run with --no-build-isolation (bash install.sh does both)")
    return tf


def stack_of(tf):
    """The stack of stacks/ that the installed TensorFlow belongs to ('2.20' for 2.20.0)."""
    stack = ".".join(tf.__version__.split(".")[:2])
    if not Path(__file__).with_name("stacks").joinpath(stack, "requirements.txt").is_file():
        raise SystemExit(f"lm1b_hvd: TensorFlow {tf.__version__} is in none of its stacks (stacks/): "
                         "bash install.sh installs one")
    return stack


def pinned_requirements(stack):
    lines = Path(__file__).with_name("stacks").joinpath(stack, "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cpu_kernels(tf, stack):
    """The TensorFlow op library of lm1b_hvd/model/kernels/*.cc, loaded by lm1b_hvd.model.cpu_kernels: the
    LSTM cell's gate arithmetic and the sampled softmax's forward. Built for CPU installs only:
    a GPU install (TensorFlow's CUDA build) runs the portable ops (lm1b_hvd.model.compute_plan), so
    it builds none unless LM1B_HVD_CPU_KERNELS=1; LM1B_HVD_CPU_KERNELS=0 skips them anywhere.
    One library per stack (lm1b_hvd.model._kernels_tf2_20), each with build files of its own:
    two environments of one checkout, one per stack, keep each its own."""
    wanted = os.environ.get("LM1B_HVD_CPU_KERNELS", "")
    if wanted == "0" or (wanted != "1" and tf.test.is_built_with_cuda()):
        return []
    # AVX2 and FMA (x86 CPUs since 2013): Eigen vectorizes the kernels' tanh and exp 8 floats at a time.
    vector_flags = ["-mavx2", "-mfma"] if platform.machine() in ("x86_64", "AMD64") else []
    sources = sorted(str(path) for path in Path("lm1b_hvd/model/kernels").glob("*.cc"))
    return [Extension(f"lm1b_hvd.model._kernels_tf{stack.replace('.', '_')}", sources=sources, language="c++",
                      extra_compile_args=tf.sysconfig.get_compile_flags() + ["-O3"] + vector_flags,
                      extra_link_args=tf.sysconfig.get_link_flags())]


TENSORFLOW = installed_tensorflow()
STACK = stack_of(TENSORFLOW)
setup(
    name="lm1b_hvd",
    version="0.1.0",
    description="LSTM language models on the One Billion Word benchmark, trained with Horovod",
    packages=find_packages(include=["lm1b_hvd", "lm1b_hvd.*"]),
    ext_modules=cpu_kernels(TENSORFLOW, STACK),
    # Each stack's own build folder: the kernels' objects of one TensorFlow are not the other's.
    options={"build": {"build_base": f"build/stack-{STACK}"}},
    python_requires=">=3.9,<3.14",
    install_requires=pinned_requirements(STACK),
    entry_points={
        "console_scripts": [
            "lm1b-train=lm1b_hvd.train:main",
            "lm1b-evaluate=lm1b_hvd.evaluate:main",
            "lm1b-prepare-data=lm1b_hvd.prepare_data:main",
            "lm1b-benchmark-data=lm1b_hvd.benchmark_data:main",
            "lm1b-bench=lm1b_hvd.bench:main",
            "lm1b-score=lm1b_hvd.score:main",
            "lm1b-sample=lm1b_hvd.sample:main",
            "lm1b-export=lm1b_hvd.export:main",
        ]
    },
)
