#!/usr/bin/env bash
# One-step set-up on a Debian machine (as root, or with sudo for apt-get):
# Open MPI from Debian, a virtual environment in .venv, the pinned stack of
# requirements.txt (Horovod built from source with TensorFlow, Gloo and MPI),
# then this package. A second run skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
for pkg in openmpi-bin libopenmpi-dev g++ cmake make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
pin() { grep -E "^$1([=<>!~ ]|$)" requirements.txt; }

# Everything but Horovod first: Horovod's build needs TensorFlow importable.
$PIP install $(grep -vE '^(#|horovod|$)' requirements.txt | tr '\n' ' ') pytest wheel setuptools

horovod_pin=$(pin horovod)
if ! $VENV/bin/python -m pip show horovod 2>/dev/null | grep -qx "Version: ${horovod_pin#horovod==}"; then
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" \
    $PIP install --no-build-isolation --no-cache-dir "$horovod_pin"
fi

$PIP install --no-build-isolation -e .
"$VENV/bin/horovodrun" --check-build
