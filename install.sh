#!/usr/bin/env bash
# One-step set-up on a Debian machine (as root, or with sudo for apt-get):
# Open MPI from Debian, a virtual environment in .venv, the pinned stack of
# requirements.txt (Horovod built from source with TensorFlow, Gloo and MPI),
# then this package. A second run skips what is already installed.
#
#   bash install.sh                    everything, CPU-only TensorFlow
#   bash install.sh --gpu              TensorFlow's CUDA build and Horovod with NCCL (builds without a GPU)
#   bash install.sh --stack-only       the stack without this package (the container's cached layer)
#   bash install.sh --system-only      Debian's packages, the environment and the stack's packages that do
#                                      not depend on TensorFlow (the layer the container images share)
#   bash install.sh --with-test-tools  also what the tests drive for real: Slurm, munge, podman,
#                                      iproute2 and sshd (scripts/local_cluster.sh)
#
# It prints one line per stage with its time; what apt and pip print goes to the log file it
# names ($INSTALL_LOG, default install.log here), and a failed stage shows that log's last lines.
# --gpu compiles Horovod's few CUDA kernels with $CUDA_HOME/bin/nvcc when CUDA_HOME is set (a
# cluster's CUDA 12 module), else with NVIDIA's CUDA 13.0 compiler wheels, kept in $VENV/cuda-build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOG=${INSTALL_LOG:-$PWD/install.log}
stack_only=0
system_only=0
test_tools=0
gpu=0
for arg in "$@"; do
  case "$arg" in
    --stack-only) stack_only=1 ;;
    --system-only) system_only=1 ;;
    --with-test-tools) test_tools=1 ;;
    --gpu) gpu=1 ;;
    *) echo "install.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

: >"$LOG"
echo "install.sh: details go to $LOG"
started=$SECONDS
stage_name=""
stage_start=0

# begin NAME: a stage starts (its line is finished by `done_stage`); the stage's own output goes to the log.
begin() {
  stage_name=$1
  stage_start=$SECONDS
  printf '%s\n' "==> $stage_name" >>"$LOG"
}
done_stage() {
  printf 'install.sh: %-44s %s (%d s)\n' "$stage_name" "$1" $((SECONDS - stage_start))
  stage_name=""
}
on_exit() {
  status=$?
  if [ "$status" -ne 0 ] && [ -n "$stage_name" ]; then
    printf 'install.sh: %-44s FAILED after %d s (exit %d); the last lines of %s:\n' \
      "$stage_name" $((SECONDS - stage_start)) "$status" "$LOG" >&2
    tail -n 25 "$LOG" | sed 's/^/  | /' >&2
    echo "install.sh: the whole log is $LOG" >&2
  fi
}
trap on_exit EXIT
quiet() { "$@" >>"$LOG" 2>&1; }

begin "system packages"
need_apt=()
for pkg in openmpi-bin libopenmpi-dev g++ cmake make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ! command -v "$PYTHON" >/dev/null; then
  need_apt+=(python3 python3-venv python3-dev)
else
  "$PYTHON" -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
  "$PYTHON" -c "import os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" \
    2>/dev/null || need_apt+=(python3-dev)
fi
dpkg -s ca-certificates >/dev/null 2>&1 || need_apt+=(ca-certificates)
if [ "$test_tools" -eq 1 ]; then
  for pkg in slurmctld slurmd slurm-client munge podman runc debootstrap iproute2 openssh-server openssh-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  quiet $SUDO apt-get update -qq
  quiet env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  done_stage "installed ${need_apt[*]}"
else
  done_stage "already installed"
fi

begin "virtual environment $VENV"
if [ -x "$VENV/bin/python" ]; then
  done_stage "already there ($("$VENV/bin/python" --version))"
else
  quiet "$PYTHON" -m venv "$VENV"
  done_stage "made ($("$VENV/bin/python" --version))"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
pin() { grep -E "^$1([=<>!~ ]|$)" requirements.txt; }

# The pins that do not depend on which TensorFlow (mpi4py compiles against Open MPI here), and the
# build tools: apart, so that the CPU and GPU images share them as one layer. TensorBoard comes with
# TensorFlow, whose release pins it.
begin "the stack's packages that do not depend on TensorFlow"
quiet $PIP install $(grep -vE '^(#|horovod|tensorflow|tensorboard|$)' requirements.txt | tr '\n' ' ') pytest wheel setuptools
done_stage "$(grep -vE '^(#|horovod|tensorflow|tensorboard|$)' requirements.txt | tr '\n' ' ')"
if [ "$system_only" -eq 1 ]; then
  echo "install.sh: done in $((SECONDS - started)) s (--system-only)"
  exit 0
fi

# One TensorFlow per environment: the CPU wheel by default, the CUDA build (and its CUDA 12, cuDNN
# and NCCL wheels) with --gpu. Switching removes the other one and the Horovod built against it.
tf_version=$(pin tensorflow-cpu); tf_version=${tf_version#tensorflow-cpu==}
if [ "$gpu" -eq 1 ]; then tf_wanted="tensorflow[and-cuda]==$tf_version"; tf_other=tensorflow-cpu
else tf_wanted="tensorflow-cpu==$tf_version"; tf_other=tensorflow; fi
begin "TensorFlow and the pinned stack"
replaced=""
if "$VENV/bin/python" -m pip show "$tf_other" >/dev/null 2>&1; then
  quiet $PIP uninstall -y "$tf_other" horovod
  replaced=", replacing $tf_other and the Horovod built against it"
fi
# Everything but Horovod first: Horovod's build needs TensorFlow importable.
quiet $PIP install "$tf_wanted" $(grep -vE '^(#|horovod|tensorflow|$)' requirements.txt | tr '\n' ' ')
done_stage "$tf_wanted$replaced"

horovod_pin=$(pin horovod)
horovod_current() {
  # (sed reads pip's whole output: `grep -q` would stop early and fail the pipe under pipefail)
  [ "$("$VENV/bin/python" -m pip show horovod 2>/dev/null | sed -n 's/^Version: //p')" = "${horovod_pin#horovod==}" ] \
    || return 1
  [ "$gpu" -eq 0 ] || "$VENV/bin/python" -c "import horovod.tensorflow as h; assert h.nccl_built()" 2>/dev/null
}
horovod_env=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
             HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)")
begin "Horovod ${horovod_pin#horovod==}, built from source"
if horovod_current; then
  done_stage "already built"
else
  if [ "$gpu" -eq 1 ]; then
    # NCCL comes from the nvidia-nccl-cu12 wheel TensorFlow brought; CMake wants an unversioned name.
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    build_dir=$(cd "$VENV" && pwd)/cuda-build
    mkdir -p "$build_dir/nccl/lib"
    ln -sfn "$site/nvidia/nccl/include" "$build_dir/nccl/include"
    ln -sfn "$site/nvidia/nccl/lib/libnccl.so.2" "$build_dir/nccl/lib/libnccl.so"
    cuda_home=${CUDA_HOME:-}
    if [ -z "$cuda_home" ]; then
      cuda_home=$build_dir/wheels/nvidia/cu13
      [ -x "$cuda_home/bin/nvcc" ] || quiet $PIP install --target "$build_dir/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
      # The layout nvcc.profile and CMake's FindCUDAToolkit expect of a toolkit.
      ln -sfn lib "$cuda_home/lib64"
      ln -sfn libcudart.so.13 "$cuda_home/lib/libcudart.so"
      mkdir -p "$cuda_home/targets"
      ln -sfn .. "$cuda_home/targets/x86_64-linux"
    fi
    # The wheel's libnccl.so.2 is on no library path: Horovod's library records where it is.
    horovod_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda_home"
                  HOROVOD_NCCL_HOME="$build_dir/nccl" HOROVOD_NCCL_LINK=SHARED
                  LDFLAGS="-Wl,-rpath,$site/nvidia/nccl/lib ${LDFLAGS:-}"
                  HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-75,80,86,89,90}")
    quiet $PIP uninstall -y horovod || true
  fi
  quiet env "${horovod_env[@]}" $PIP install --no-build-isolation --no-cache-dir "$horovod_pin"
  done_stage "built$([ "$gpu" -eq 1 ] && echo " with NCCL")"
fi

if [ "$stack_only" -eq 0 ]; then
  begin "lm1b_hvd (this package)"
  quiet $PIP install --no-build-isolation --no-deps -e .
  if "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('lm1b_hvd.model._kernels')" 2>/dev/null; then
    done_stage "installed, with its CPU kernels"
  else
    done_stage "installed, without CPU kernels (GPU stack: the portable ops run)"
  fi
fi

begin "check"
quiet "$VENV/bin/horovodrun" --check-build
quiet "$VENV/bin/python" -c "import horovod.tensorflow as hvd; assert hvd.mpi_built() and hvd.gloo_built()"
summary=$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -c "
import tensorflow as tf, horovod, horovod.tensorflow as hvd
nccl = hvd.nccl_built()
if $gpu:
    info = tf.sysconfig.get_build_info()
    assert tf.test.is_built_with_cuda() and nccl, 'the GPU stack lacks CUDA or NCCL'
    print(f'GPU stack: TensorFlow {tf.__version__} (CUDA {info[\"cuda_version\"]}, cuDNN {info[\"cudnn_version\"]}),',
          f'Horovod {horovod.__version__} with NCCL {nccl // 10000}.{nccl // 100 % 100}.{nccl % 100}, MPI and Gloo')
else:
    print(f'TensorFlow {tf.__version__} (CPU), Horovod {horovod.__version__} with TensorFlow, MPI and Gloo')
" 2>>"$LOG")
done_stage "$summary"
echo "install.sh: done in $((SECONDS - started)) s"
