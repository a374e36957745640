#!/usr/bin/env bash
# Fetch the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network access:
# the peers its neuron and model benchmarks compare against (SpikingJelly 2.0.0 and its logger,
# snnTorch 1.0.0; pure Python), into .whl/ (git-ignored) beside the checkout, for the Python
# version given (default 3.12, the GPU image's). Norse is left out: it has no wheel for every
# Python, and the benchmarks leave out the peers that are not installed. So is CuPy, which the
# authors' pin SpikingJelly 0.0.0.0.12 needs for its GPU kernels: cupy-cuda13x 14.2.0's wheel for
# Python 3.12 is 69.4 MB, more than the 64 MiB the device tool carries to a GPU machine in all.
# Run it where pip can reach a package index; then carry .whl to the GPU machine with the checkout.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl spikingjelly==2.0.0 loguru==0.7.3 snntorch==1.0.0
ls -l .whl
