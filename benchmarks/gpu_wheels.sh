#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.sh installs on a GPU machine without network access, for the
# Python version given (default 3.12, the GPU image's). Run it where pip can reach a package index;
# then carry .whl/ (git-ignored) to the GPU machine with the checkout.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
#     the peers its neuron and model benchmarks compare against: SpikingJelly 2.0.0 and its logger,
#     snnTorch 1.0.0 (pure Python), as wheels in .whl/. Norse is left out: it has no wheel for every
#     Python, and the benchmarks leave out the peers that are not installed.
#
#   bash benchmarks/gpu_wheels.sh --authors-pin [PYTHON_VERSION]
#     the authors' pin for `gpu_check.sh --authors-pin`: SpikingJelly 0.0.0.0.12 with CuPy for CUDA
#     13 (its GPU kernels; cuda-pathfinder finds the CUDA libraries PyTorch's wheels installed) and
#     fastrlock, unpacked into one folder and packed as .whl/authors-pin.tar.xz. CuPy's wheel alone
#     (cupy-cuda13x 14.2.0 for Python 3.12: 69.4 MB) is larger than the 64 MiB the device tool
#     carries in all; xz brings the whole pin to about 52 MB (about 2 minutes of compressing).
set -euo pipefail
cd "$(dirname "$0")/.."
pin=0
if [ "${1:-}" = "--authors-pin" ]; then
  pin=1
  shift
fi
version="${1:-3.12}"
mkdir -p .whl
download() {  # download DEST PACKAGE...: binary wheels for the target Python, no dependencies
  local dest="$1"
  shift
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "$@"
}
if [ "$pin" = 0 ]; then
  download .whl spikingjelly==2.0.0 loguru==0.7.3 snntorch==1.0.0
  ls -l .whl
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
download "$work/wheels" spikingjelly==0.0.0.0.12 cupy-cuda13x==14.2.0 "cuda-pathfinder>=1.3.4,<2" fastrlock
mkdir "$work/site"
for whl in "$work"/wheels/*.whl; do
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" "$work/site"
done
chmod -R u+rwX,go+rX "$work/site"
find "$work/site" -name "*.so*" -exec chmod +x {} +
tar -C "$work/site" -cf - . | xz -T0 -9 > .whl/authors-pin.tar.xz.part
mv .whl/authors-pin.tar.xz.part .whl/authors-pin.tar.xz
ls -l .whl
