#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine that has CUDA torch and
# torchvision but not MMEngine (and no package index).
#
#   bash benchmarks/gpu_check.sh --fetch   # here, with a registry: saves the
#                                          # pure-Python wheels into .whl/
#   bash benchmarks/gpu_check.sh [ARGS]    # there: installs .whl/ into
#                                          # /tmp/site, runs gpu_check.py ARGS
#
# The wheels are MMEngine and those of its needs that such an image usually
# lacks (addict, yapf, termcolor, platformdirs); .whl/ is git-ignored, so it
# has to be carried to the machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
        || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 \
        termcolor==3.3.0 platformdirs==4.14.9
    exit 0
fi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
exec python3 benchmarks/gpu_check.py "$@"
