"""Shared test helpers: where ``../shared`` (real data and golden fixtures) lives, skipping without it,
the benchmarks folder on the path, and the device and LIF backends the neuron tests run on."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# the benchmark scripts and their helpers (benchmarks/*.py) are not part of the package: import them from the repository
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

# tests/test_neuron.py and tests/test_kernels.py run on this device (``benchmarks/gpu_check.sh`` sets cuda);
# the "triton" backend runs there on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
# set by tests/test_kernels.py::test_triton_kernels_under_interpreter for a subprocess)
DEVICE = torch.device(os.environ.get("SPIKINGFORMER_TEST_DEVICE", "cpu"))
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_BACKENDS = ["torch", "cpu"] + (["triton"] if TRITON_INTERPRET or DEVICE.type == "cuda" else [])


def skip_unusable(backend: str) -> None:
    """Skip a LIF backend that cannot take tensors on ``DEVICE``."""
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the 'cpu' backend is for CPU tensors")


def require(path: Path) -> Path:
    """Skip the calling test with a clear reason if ``path`` (under ../shared) is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: golden fixtures and real data live in ../shared next to the repository")
    return path



CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def write_cifar_folders(root: Path, per_class: int = 2) -> None:
    """A CIFAR-10 class-folder tree of tiny PNGs (grey level = class * 20 + index)."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(CIFAR_CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32, 3), c * 20 + i, np.uint8)).save(root / split / name / f"{i}.png")


@pytest.fixture
def full_disk(monkeypatch):
    """Makes every file opened with ``os.fdopen`` (the package's atomic writes) sit on a disk that
    fills after ``room`` bytes: a short write, then ``ENOSPC``, as the OS does. Call it with ``room``."""
    import errno
    import io

    def fill(room: int) -> None:
        class FillingDisk(io.FileIO):
            def write(self, data):
                nonlocal room
                n = min(len(data), room)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                room -= n
                return super().write(memoryview(data)[:n])

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: io.BufferedWriter(FillingDisk(fd, mode)))

    return fill


def saved_bytes(fn):
    """``(fn(), bytes)``: the output of ``fn()`` and the bytes of the distinct storages autograd
    keeps for backward while it runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def assert_gradients_close(got, want, rel: float | None = None) -> None:
    """Gradients of a fused training route against the module calls'. The routes' BN backward sums
    its two reductions in another order than PyTorch's kernel (float partial sums per map row,
    float64 across rows: ``cpu_backend.bn_lif_pool_backward``), so the gradients agree to rounding,
    not bit for bit: every element within ``rel`` of the largest magnitude among all of them. The
    scale is shared because a bias in front of a training BN has a true gradient of zero: both sides
    give rounding noise there. ``rel``: 1e-4 in float32 (PyTorch's own float accumulation is off by
    about 1.5e-5 at 67 million values), 1e-2 in bfloat16 or for float32 gradients computed through
    bfloat16 activations under autocast (a unit in the last place is 2^-8 of a value)."""
    got, want = list(got), list(want)
    assert len(got) == len(want) and want
    assert all(g.dtype == w.dtype and g.shape == w.shape for g, w in zip(got, want))
    if rel is None:
        rel = 1e-2 if any(w.dtype in (torch.bfloat16, torch.float16) for w in want) else 1e-4
    bound = rel * max(w.abs().max().item() for w in want)
    assert bound > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0.0, atol=bound)


def batch_norm_eps_error(eps: float, training: bool) -> str | None:
    """What a BatchNorm module of this PyTorch raises for ``eps`` (in ``training`` or not), escaped as a
    pattern for ``pytest.raises(match=...)``, or ``None`` where it takes that ``eps``: the rule differs
    between releases (2.14 refuses ``eps <= 0`` in training and ``eps < 0`` otherwise, 2.11 ``eps <= 0``
    always, 2.8 nothing)."""
    try:
        nn.BatchNorm1d(2, eps=eps).train(training)(torch.randn(4, 2))
    except ValueError as refused:
        return re.escape(str(refused))
    return None


def active_model(name: str, batch: int = 8, **overrides) -> tuple[nn.Module, list[torch.Tensor]]:
    """A zoo model in eval mode with BatchNorm calibrated on a batch of synthetic inputs (returned with
    it) and livelier q/k/v neurons, so that every layer sees spikes."""
    from spikingformer import create_model
    from spikingformer.analysis.inputs import calibrate_batchnorm, random_batches

    torch.manual_seed(0)
    model = create_model(name, **overrides)
    batches = random_batches(model.config, 1, batch, seed=1)
    calibrate_batchnorm(model, batches)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(f".attn.{o}" in n for o in "qkv"):
                m.weight.fill_(2.0)
                m.bias.fill_(0.5)
    return model.eval(), batches
