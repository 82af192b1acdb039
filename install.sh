#!/usr/bin/env bash
# One-step set-up on a Debian machine (as root, or with sudo for apt-get):
# Open MPI from Debian, a virtual environment in .venv, one of the pinned stacks of stacks/
# (TensorFlow, and Horovod 0.28.1 built from its source with the patches of stacks/horovod-0.28.1/,
# with TensorFlow, Gloo and MPI), then this package. A second run skips what is already installed.
#
# The stack follows the Python: 2.15 (TensorFlow 2.15.1) on Python 3.9-3.11, 2.20 (TensorFlow
# 2.20.0 with tf-keras) on Python 3.12-3.13. $PYTHON names the Python (default python3).
#
#   bash install.sh                    everything, CPU-only TensorFlow
#   bash install.sh --stack 2.20       that stack, if this Python runs it (both run on 3.9-3.11)
#   bash install.sh --gpu              TensorFlow's CUDA build and Horovod with NCCL (builds without a GPU)
#   bash install.sh --stack-only       the stack without this package (the container's cached layer)
#   bash install.sh --system-only      Debian's packages, the environment and the stack's packages that do
#                                      not depend on TensorFlow (the layer the container images share)
#   bash install.sh --with-test-tools  also what the tests drive for real: Slurm, munge, podman,
#                                      iproute2 and sshd (scripts/local_cluster.sh)
#   PYTHON=python3.12 VENV=.venv-2.20 bash install.sh     a second environment beside .venv
#
# It prints one line per stage with its time; what apt and pip print goes to the log file it
# names ($INSTALL_LOG, default install.log here), and a failed stage shows that log's last lines.
# --gpu compiles Horovod's few CUDA kernels with $CUDA_HOME/bin/nvcc when CUDA_HOME is set (a
# cluster's CUDA 12 module), else with NVIDIA's CUDA 13.0 compiler wheels, kept in $VENV/cuda-build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
python_given=${PYTHON:+1}
PYTHON=${PYTHON:-python3}
LOG=${INSTALL_LOG:-$PWD/install.log}
HOROVOD_PATCHES=stacks/horovod-0.28.1
stack_only=0
system_only=0
test_tools=0
gpu=0
stack=""
while [ $# -gt 0 ]; do
  case "$1" in
    --stack-only) stack_only=1 ;;
    --system-only) system_only=1 ;;
    --with-test-tools) test_tools=1 ;;
    --gpu) gpu=1 ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    --stack=*) stack=${1#--stack=} ;;
    --stack) [ $# -ge 2 ] || { echo "install.sh: --stack needs a stack: 2.15 or 2.20" >&2; exit 2; }
             stack=$2; shift ;;
    *) echo "install.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

# The stacks, and the Pythons each runs on (TensorFlow's wheels).
stack_pythons() { case "$1" in 2.15) echo "3.9 3.10 3.11" ;; 2.20) echo "3.9 3.10 3.11 3.12 3.13" ;; esac; }
stack_span() { case "$1" in 2.15) echo "3.9-3.11" ;; 2.20) echo "3.9-3.13" ;; esac; }
default_stack() { case "$1" in 3.9|3.10|3.11) echo 2.15 ;; 3.12|3.13) echo 2.20 ;; esac; }
refuse() { echo "install.sh: $*" >&2; exit 2; }
if [ -n "$stack" ] && [ -z "$(stack_pythons "$stack")" ]; then
  refuse "--stack $stack: no such stack; the stacks are 2.15 (TensorFlow 2.15.1) and 2.20 (TensorFlow 2.20.0)"
fi

# Which Python, and so which stack: decided before anything is installed. A missing python3 is
# Debian's to install (below); a Python named in $PYTHON must run. pyenv's shim of a version that
# pyenv has but has not selected does not run: that version's own python3.X is taken instead.
python_version=""
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if ! "$PYTHON" -c pass >/dev/null 2>&1 && [[ "$PYTHON" =~ ^python3\.[0-9]+$ ]] && command -v pyenv >/dev/null; then
  for candidate in "$(pyenv root)"/versions/${PYTHON#python}.*/bin/"$PYTHON"; do
    if [ -x "$candidate" ]; then PYTHON=$candidate; break; fi
  done
fi
if command -v "$PYTHON" >/dev/null 2>&1; then
  python_version=$(version_of "$PYTHON" 2>/dev/null) \
    || refuse "PYTHON=$PYTHON does not run here; name a Python that does, e.g. PYTHON=python3.12"
elif [ -n "$python_given" ]; then
  refuse "PYTHON=$PYTHON: no such command; name a Python that runs here, e.g. PYTHON=python3.12"
fi
choose_stack() {
  if [ -z "$stack" ]; then
    stack=$(default_stack "$python_version")
    [ -n "$stack" ] || refuse "Python $python_version ($PYTHON) has no stack: TensorFlow 2.15.1 runs on" \
      "Python 3.9-3.11 and TensorFlow 2.20.0 on 3.9-3.13; name one with PYTHON=, e.g. PYTHON=python3.12 bash install.sh"
  elif ! [[ " $(stack_pythons "$stack") " == *" $python_version "* ]]; then
    refuse "--stack $stack needs Python $(stack_span "$stack"), and $PYTHON is Python $python_version;" \
      "name one with PYTHON=, e.g. PYTHON=python3.11, or leave out --stack"
  fi
  if [ -x "$VENV/bin/python" ]; then
    venv_version=$(version_of "$VENV/bin/python")
    [ "$venv_version" = "$python_version" ] || refuse "$VENV was made with Python $venv_version, not" \
      "$python_version ($PYTHON); give another VENV=, or remove $VENV"
  fi
  REQUIREMENTS=stacks/$stack/requirements.txt
}
[ -z "$python_version" ] || choose_stack

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
for pkg in openmpi-bin libopenmpi-dev g++ cmake make patch; do
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
if [ -z "$python_version" ]; then
  python_version=$(version_of "$PYTHON")
  choose_stack
fi

begin "virtual environment $VENV"
if [ -x "$VENV/bin/python" ]; then
  done_stage "already there ($("$VENV/bin/python" --version))"
else
  quiet "$PYTHON" -m venv "$VENV"
  done_stage "made ($("$VENV/bin/python" --version))"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
pin() { grep -E "^$1([=<>!~ ]|$)" "$REQUIREMENTS"; }
# The pins by what they depend on: TensorFlow's own packages (tf-keras, TensorBoard, Horovod's
# build) and the rest.
tensorflow_free_pins=$(grep -vE '^(#|horovod|tensorflow|tf-keras|tensorboard|$)' "$REQUIREMENTS" | tr '\n' ' ')

# What Horovod is built from and against: a build whose record (in the environment) differs is redone.
horovod_pin=$(pin horovod)
horovod_version=${horovod_pin#horovod==}
tf_version=$(pin tensorflow-cpu); tf_version=${tf_version#tensorflow-cpu==}
patches=()
while read -r name; do
  case "$name" in ''|'#'*) ;; *) patches+=("$HOROVOD_PATCHES/$name") ;; esac
done <"$HOROVOD_PATCHES/series"
patch_digest=$(cat "$HOROVOD_PATCHES/series" "${patches[@]}" | sha256sum | cut -c1-12)
horovod_build="horovod $horovod_version, TensorFlow $tf_version, $([ "$gpu" -eq 1 ] && echo GPU || echo CPU), patches $patch_digest"
horovod_record=$VENV/horovod-build.txt
horovod_current() {
  # (sed reads pip's whole output: `grep -q` would stop early and fail the pipe under pipefail)
  [ "$("$VENV/bin/python" -m pip show horovod 2>/dev/null | sed -n 's/^Version: //p')" = "$horovod_version" ] \
    && [ "$(cat "$horovod_record" 2>/dev/null)" = "$horovod_build" ]
}

# Horovod's source, patched, before anything in the environment changes: a patch that does not
# apply stops here, with the environment as it was.
horovod_source=$VENV/horovod-source/horovod-$horovod_version
if [ "$system_only" -eq 0 ] && ! horovod_current; then
  begin "Horovod $horovod_version's source, with ${#patches[@]} patches"
  sdist=$VENV/horovod-source/horovod-$horovod_version.tar.gz
  mkdir -p "$VENV/horovod-source"
  source_sum=$PWD/$HOROVOD_PATCHES/source.sha256
  if ! (cd "$VENV/horovod-source" && sha256sum -c --quiet "$source_sum") >>"$LOG" 2>&1; then
    quiet $PIP download --no-deps --no-binary horovod --dest "$VENV/horovod-source" "$horovod_pin"
    (cd "$VENV/horovod-source" && sha256sum -c --quiet "$source_sum") >>"$LOG" 2>&1
  fi
  rm -rf "$horovod_source"
  tar -xzf "$sdist" -C "$VENV/horovod-source"
  for patch_file in "${patches[@]}"; do
    if ! patch_output=$(patch -d "$horovod_source" -p1 --forward --batch --no-backup-if-mismatch -r - \
                        <"$patch_file" 2>&1); then
      printf '%s\n' "$patch_output" >>"$LOG"
      failed=$(printf '%s\n' "$patch_output" | awk '/^patching file /{file=$3} /FAILED/{line=$5; sub(/\.$/, "", line); print "hunk " $2 " of " file " failed at line " line; exit}')
      stage_name=""
      echo "install.sh: Horovod patch $patch_file does not apply to horovod-$horovod_version:" \
        "${failed:-$(printf '%s\n' "$patch_output" | tail -n 1)}; nothing in $VENV changed" >&2
      rm -rf "$horovod_source"
      exit 1
    fi
  done
  done_stage "$(printf '%s ' "${patches[@]##*/}")"
fi

# The pins that do not depend on which TensorFlow (mpi4py compiles against Open MPI here), and the
# build tools: apart, so that the CPU and GPU images share them as one layer. TensorBoard comes with
# TensorFlow, whose release pins it.
begin "the stack's packages that do not depend on TensorFlow"
quiet $PIP install $tensorflow_free_pins pytest wheel setuptools
done_stage "stack $stack: $tensorflow_free_pins"
if [ "$system_only" -eq 1 ]; then
  echo "install.sh: done in $((SECONDS - started)) s (--system-only)"
  exit 0
fi

# One TensorFlow per environment: the CPU wheel by default, the CUDA build (and its CUDA 12, cuDNN
# and NCCL wheels) with --gpu. Switching removes the other one and the Horovod built against it;
# switching stacks replaces TensorFlow and rebuilds Horovod (its record says what it was built against).
if [ "$gpu" -eq 1 ]; then tf_wanted="tensorflow[and-cuda]==$tf_version"; tf_other=tensorflow-cpu
else tf_wanted="tensorflow-cpu==$tf_version"; tf_other=tensorflow; fi
begin "TensorFlow and the pinned stack"
replaced=""
if "$VENV/bin/python" -m pip show "$tf_other" >/dev/null 2>&1; then
  quiet $PIP uninstall -y "$tf_other" horovod
  replaced=", replacing $tf_other and the Horovod built against it"
fi
keras2=$(pin tf-keras || true)
if [ -z "$keras2" ] && "$VENV/bin/python" -m pip show tf-keras >/dev/null 2>&1; then
  quiet $PIP uninstall -y tf-keras  # another stack's: lm1b_hvd would choose it over this TensorFlow's Keras
fi
# Everything but Horovod first: Horovod's build needs TensorFlow importable.
quiet $PIP install "$tf_wanted" $(grep -vE '^(#|horovod|tensorflow|tf-keras|$)' "$REQUIREMENTS" | tr '\n' ' ')
[ -z "$keras2" ] || quiet $PIP install --no-deps "$keras2"
done_stage "stack $stack: $tf_wanted${keras2:+, $keras2}$replaced"

horovod_env=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
             HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)")
begin "Horovod $horovod_version, built from source"
if horovod_current; then
  done_stage "already built ($horovod_build)"
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
  fi
  rm -f "$horovod_record"
  quiet $PIP uninstall -y horovod || true
  quiet env "${horovod_env[@]}" $PIP install --no-build-isolation --no-cache-dir "$horovod_source"
  echo "$horovod_build" >"$horovod_record"
  rm -rf "$horovod_source"
  done_stage "built$([ "$gpu" -eq 1 ] && echo " with NCCL") against TensorFlow $tf_version"
fi

if [ "$stack_only" -eq 0 ]; then
  begin "lm1b_hvd (this package)"
  quiet $PIP install --no-build-isolation --no-deps --use-pep517 -e .
  if "$VENV/bin/python" -c "from lm1b_hvd.model import cpu_kernels; assert cpu_kernels.built()" 2>>"$LOG"; then
    done_stage "installed, with its CPU kernels for TensorFlow $tf_version"
  else
    done_stage "installed, without CPU kernels (GPU stack: the portable ops run)"
  fi
fi

begin "check"
keras2_env=(); [ -z "$keras2" ] || keras2_env=(TF_USE_LEGACY_KERAS=1)
quiet "$VENV/bin/horovodrun" --check-build
quiet "$VENV/bin/python" -c "import horovod.tensorflow as hvd; assert hvd.mpi_built() and hvd.gloo_built()"
summary=$(env TF_CPP_MIN_LOG_LEVEL=3 "${keras2_env[@]}" "$VENV/bin/python" -c "
import importlib.metadata, tensorflow as tf, horovod, horovod.tensorflow as hvd
nccl = hvd.nccl_built()
keras = importlib.metadata.version(tf.keras.optimizers.Adagrad.__module__.split('.')[0].replace('_', '-'))
if $gpu:
    info = tf.sysconfig.get_build_info()
    assert tf.test.is_built_with_cuda() and nccl, 'the GPU stack lacks CUDA or NCCL'
    print(f'stack $stack on the GPU: TensorFlow {tf.__version__} (CUDA {info[\"cuda_version\"]}, cuDNN {info[\"cudnn_version\"]}),',
          f'Keras {keras}, Horovod {horovod.__version__} with NCCL {nccl // 10000}.{nccl // 100 % 100}.{nccl % 100}, MPI and Gloo')
else:
    print(f'stack $stack: TensorFlow {tf.__version__} (CPU), Keras {keras}, Horovod {horovod.__version__} with TensorFlow, MPI and Gloo')
assert keras.startswith('2.'), f'tf.keras is Keras {keras}, not Keras 2'
" 2>>"$LOG")
done_stage "$summary"
echo "install.sh: done in $((SECONDS - started)) s (stack $stack in $VENV)"
