#!/usr/bin/env bash
# GPU check (run from anywhere on a CUDA machine; < 10 minutes). Without a CUDA device it says so
# and exits 0. Steps:
#   1. the kernel and neuron tests on the GPU: every backend (torch, triton) against the reference computed on
#      the same GPU -- spikes bit-exact, gradients to 1e-6 (fp32) / the dtype's rounding (fp16, bf16);
#   2. the neuron benchmark on the GPU (SpikingJelly columns only if spikingjelly is installed);
#   3. our Triton neuron against today's peers on CUDA: SpikingJelly 2.0 (its own CUDA/Triton
#      kernel, picked automatically), snnTorch and Norse where installed, spikes checked first;
#   4. the compiled model on CUDA (torch.compile, fullgraph, Inductor's Triton code around the
#      spikingformer::lif operator) against eager, training step and inference;
#   5. the model benchmark on the GPU against the authors' code with SpikingJelly's neurons (cupy
#      backend if CuPy imports, else torch), fp32 and bf16 autocast, if spikingjelly is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch: skipping the GPU check"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'PY'
import torch
from spikingformer import kernels
x = torch.zeros(4, 8, device="cuda")
print("torch", torch.__version__, "| backends:", kernels.available_backends(), "| auto picks:", kernels.select_backend(x))
assert kernels.select_backend(x) == "triton", "Triton backend not selected for CUDA tensors"
PY

echo "== kernel tests on cuda =="
SPIKINGFORMER_TEST_DEVICE=cuda timeout 200 python -m pytest tests/test_kernels.py tests/test_neuron.py -q -p no:cacheprovider -k "not interpreter"

echo "== neuron benchmark on cuda =="
timeout 120 python benchmarks/bench_lif.py --device cuda --budget 0.2 --max-reps 15 --rounds 2

echo "== our Triton neuron against today's peers on cuda =="
timeout 180 python benchmarks/bench_lif_peers.py --device cuda --threads 1 --reps 10 --rounds 2

echo "== torch.compile against eager on cuda =="
timeout 300 python benchmarks/bench_compile.py --device cuda --steps 5 --models spikingformer_digits spikingformer_cifar10_4_256

echo "== model benchmark on cuda =="
if python -c "import spikingjelly" 2>/dev/null; then
  timeout 240 python benchmarks/bench_model.py --device cuda --steps 3 --threads 1
else
  echo "spikingjelly is not installed: skipping the model benchmark (pip install spikingjelly==0.0.0.0.14)"
fi
