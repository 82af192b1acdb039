#!/usr/bin/env bash
# One-step set-up on a Debian machine (as root, or with sudo for apt-get):
# Open MPI from Debian, a virtual environment in .venv, the pinned stack of
# requirements.txt (Horovod built from source with TensorFlow, Gloo and MPI),
# then this package. A second run skips what is already installed.
#
#   bash install.sh                    everything
#   bash install.sh --stack-only       the stack without this package (the container's cached layer)
#   bash install.sh --with-test-tools  also what the tests drive for real: Slurm, munge, podman
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stack_only=0
test_tools=0
for arg in "$@"; do
  case "$arg" in
    --stack-only) stack_only=1 ;;
    --with-test-tools) test_tools=1 ;;
    *) echo "install.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

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
  for pkg in slurmctld slurmd slurm-client munge podman runc debootstrap; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
pin() { grep -E "^$1([=<>!~ ]|$)" requirements.txt; }

# Everything but Horovod first: Horovod's build needs TensorFlow importable.
$PIP install $(grep -vE '^(#|horovod|$)' requirements.txt | tr '\n' ' ') pytest wheel setuptools

horovod_pin=$(pin horovod)
if ! "$VENV/bin/python" -m pip show horovod 2>/dev/null | grep -qx "Version: ${horovod_pin#horovod==}"; then
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" \
    $PIP install --no-build-isolation --no-cache-dir "$horovod_pin"
fi

if [ "$stack_only" -eq 0 ]; then
  $PIP install --no-build-isolation -e .
fi
"$VENV/bin/horovodrun" --check-build
