#!/usr/bin/env bash
# GPU check for the fused LIF kernels (run from anywhere on a CUDA machine; < 5 minutes):
#   1. the kernel tests on the GPU: every backend (torch, triton) against the reference computed on
#      the same GPU -- spikes bit-exact, gradients to 1e-6 (fp32) / the dtype's rounding (fp16, bf16);
#   2. the neuron benchmark on the GPU (SpikingJelly columns only if spikingjelly is installed);
#   3. the model benchmark on the GPU against the authors' code with SpikingJelly's neurons (cupy
#      backend if CuPy imports, else torch), fp32 and bf16 autocast, if spikingjelly is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
from spikingformer import kernels
x = torch.zeros(4, 8, device="cuda")
print("torch", torch.__version__, "| backends:", kernels.available_backends(), "| auto picks:", kernels.select_backend(x))
assert kernels.select_backend(x) == "triton", "Triton backend not selected for CUDA tensors"
PY

echo "== kernel tests on cuda =="
SPIKINGFORMER_TEST_DEVICE=cuda timeout 200 python -m pytest tests/test_kernels.py -q -p no:cacheprovider -k "not interpreter"

echo "== neuron benchmark on cuda =="
timeout 120 python benchmarks/bench_lif.py --device cuda --budget 0.2 --max-reps 15 --rounds 2

echo "== model benchmark on cuda =="
if python -c "import spikingjelly" 2>/dev/null; then
  timeout 240 python benchmarks/bench_model.py --device cuda --steps 3 --threads 1
else
  echo "spikingjelly is not installed: skipping the model benchmark (pip install spikingjelly==0.0.0.0.14)"
fi
